"""EWC and LwF together (docs/methods.md §5.8): the Fisher-weighted pull of the weights toward
theta0 (§5.1) and soft-target distillation from the frozen base (§5.6) in one run, each with its
own weight (`penalty.weights.ewc`, `penalty.weights.lwf`); both terms are logged. Sweep the EWC
weight as for EWC alone (1e0 ... 1e6 by decades)."""
from mllm_tune.configs import base


def get_config():
  c = base.get_config().penalty
  c.name = "ewc+lwf"
  c.weights.ewc = 1e3
  c.weights.lwf = 1.0          # lambda_o
  c.fisher_kind = "empirical"  # empirical | true (sampled labels)
  c.fisher_samples = 512
  c.temperature = 2.0          # LwF's T
  return c
