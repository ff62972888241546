"""Houlsby bottleneck adapter (docs/methods.md §3.1): m = 64 on o_proj and down_proj outputs,
weights N(0, 0.01^2) truncated at 2 sigma. The paper also trains the block norms:
`--config.method.train_norms='llm/layers_\\d+/(input_norm|post_attn_norm)/scale'`."""
import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.name = "adapter"
  c.bottleneck = 64
  c.targets = r"llm/layers_\d+/(attn/o_proj|mlp/down_proj)"
  c.init_std = 0.01
  c.train_norms = ""
  return c
