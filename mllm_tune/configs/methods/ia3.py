"""(IA)^3 (docs/methods.md §3.5; Liu et al. 2022): peft's Llama defaults, k/v output and down_proj
input rescaling, init ones. Mergeable."""
import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.name = "ia3"
  c.targets = r"llm/layers_\d+/(attn/(k|v)_proj|mlp/down_proj)"
  c.feedforward = r"llm/layers_\d+/mlp/down_proj"
  return c
