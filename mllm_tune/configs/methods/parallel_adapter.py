"""Parallel adapter (docs/methods.md §3.2; He et al. 2022 "scaled PA"): s = 4, m = 512 beside every
FFN."""
import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.name = "parallel_adapter"
  c.bottleneck = 512
  c.scale = 4.0
  c.targets = r"llm/layers_\d+/mlp"
  return c
