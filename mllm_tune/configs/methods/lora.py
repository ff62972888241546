"""LoRA (docs/methods.md §4.1). Defaults: peft's r 8 / alpha 8 / dropout 0 on q, v.
LLaVA-1.5 recipe: `--config.method.rank=128 --config.method.alpha=256 --config.method.dropout=0.05
--config.method.targets='llm/layers_\\d+/(attn/(q|k|v|o)_proj|mlp/(gate|up|down)_proj)'`
(lr 2e-4, projector lr 2e-5)."""
import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.name = "lora"
  c.rank = 8
  c.alpha = 8.0
  c.dropout = 0.0
  c.targets = r"llm/layers_\d+/attn/(q|v)_proj"
  c.init_a = "kaiming"
  c.lora_bias = False  # peft's lora_bias: a trained output bias s * b beside B
  return c
