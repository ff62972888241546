"""BitFit (docs/methods.md §2.2): train every bias. `add_missing_bias=True` adds zero biases to the
bias-free LLM projections (Llama); merge them with `selective.merge_with_model` (Llama
attention_bias / mlp_bias)."""
import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.name = "bitfit"
  c.targets = r".*/bias"
  c.add_missing_bias = False
  c.missing_bias_targets = r"llm/layers_\d+/(attn/(q|k|v|o)_proj|mlp/(gate|up|down)_proj)"
  return c
