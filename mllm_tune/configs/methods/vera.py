"""VeRA (docs/methods.md §4.5): peft defaults r 256, d_initial 0.1 (use a higher lr than LoRA)."""
import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.name = "vera"
  c.rank = 256
  c.d_initial = 0.1
  c.dropout = 0.0
  c.targets = r"llm/layers_\d+/attn/(q|v)_proj"
  c.projection_prng_key = 0
  return c
