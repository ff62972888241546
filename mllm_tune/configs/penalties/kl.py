"""Token-level KL to the frozen base (docs/methods.md §5.7): beta * mean_t KL(p_ref || p_theta)
(`direction=reverse`: KL(p_theta || p_ref)) over supervised tokens (or `tokens=all`), optional
temperature with T^2."""
from mllm_tune.configs import base


def get_config():
  c = base.get_config().penalty
  c.name = "kl"
  c.weight = 0.1   # beta [choice]: sweep
  c.temperature = 1.0
  c.t2_scale = True
  c.direction = "forward"
  c.tokens = "supervised"
  return c
