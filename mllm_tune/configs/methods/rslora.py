"""rsLoRA (docs/methods.md §4.2): LoRA with scale alpha / sqrt(r)."""
import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.name = "rslora"
  c.rank = 16
  c.alpha = 16.0
  c.dropout = 0.0
  c.targets = r"llm/layers_\d+/attn/(q|v)_proj"
  c.lora_bias = False  # peft's lora_bias: a trained output bias s * b beside B
  return c
