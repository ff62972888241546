"""DoRA (docs/methods.md §4.3): magnitude x normalized LoRA-updated direction (peft `use_dora`)."""
import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.name = "dora"
  c.rank = 8
  c.alpha = 8.0
  c.dropout = 0.0
  c.targets = r"llm/layers_\d+/attn/(q|v)_proj"
  return c
