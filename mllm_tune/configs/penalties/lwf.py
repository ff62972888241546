"""LwF (docs/methods.md §5.6): lambda_o * cross-entropy of the student's softened outputs against
the frozen base's (T = 2, no T^2) at supervised positions of the downstream batch."""
from mllm_tune.configs import base


def get_config():
  c = base.get_config().penalty
  c.name = "lwf"
  c.weight = 1.0
  c.temperature = 2.0
  c.t2_scale = False
  c.tokens = "supervised"
  return c
