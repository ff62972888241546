"""A random tiny model built from config fields (tests, smoke runs, CPU demos)."""
from mllm_tune.configs import base


def get_config(with_vision: bool = False):
  m = base.get_config().model
  m.source = "tiny"
  if with_vision:
    m.tiny.vision_layers = 2
  return m
