"""MAS (docs/methods.md §5.5): lambda sum Omega (w - theta0)^2, Omega = mean |grad of the mean
squared logit norm at answer positions| (label-free: unlabelled general data works)."""
from mllm_tune.configs import base


def get_config():
  c = base.get_config().penalty
  c.name = "mas"
  c.weight = 1.0
  c.fisher_samples = 512
  return c
