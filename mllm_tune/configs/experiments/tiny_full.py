"""Smoke experiment: full fine-tuning of a tiny random model over the synthetic token stream."""
from mllm_tune.configs import base


def get_config():
  c = base.get_config()
  c.run_dir = "runs/tiny_full"
  c.optimizer.learning_rate = 1e-3
  c.train.steps = 40
  c.train.save_every = 20
  return c
