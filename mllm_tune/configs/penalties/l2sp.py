"""L2-SP (docs/methods.md §5.4): (alpha/2) ||w_S - w0_S||^2 + (beta/2) ||w_Sbar||^2, a coupled loss
term; alpha = 0.1, beta = 0.01 [paper, from memory: re-tune]. S: base leaves the method changes
(a LoRA delta counts through its merged weight), Sbar: adapter leaves no merge folds."""
from mllm_tune.configs import base


def get_config():
  c = base.get_config().penalty
  c.name = "l2sp"
  c.weight = 0.1   # alpha
  c.beta = 0.01
  return c
