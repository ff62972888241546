"""PiSSA (docs/methods.md §4.4): LoRA initialised on the principal singular directions; alpha =
r."""
import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.name = "pissa"
  c.rank = 8
  c.alpha = 8.0
  c.dropout = 0.0
  c.targets = r"llm/layers_\d+/attn/(q|v)_proj"
  return c
