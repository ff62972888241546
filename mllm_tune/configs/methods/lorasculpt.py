"""LoRASculpt (docs/methods.md §4.6), the released LLaVA-1.5-7B recipe: LoRA r 32, alpha 64, dropout
0.05 on every LLM linear; factors sparsified to rho = 10% at step 100; CMR lambda 1e-3, omega 1
(lr 2e-4 cosine, warmup 3%, 3 epochs)."""
import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.name = "lorasculpt"
  c.rank = 32
  c.alpha = 64.0
  c.dropout = 0.05
  c.targets = r"llm/layers_\d+/(attn/(q|k|v|o)_proj|mlp/(gate|up|down)_proj)"
  c.rho = 0.1
  c.t0 = 100
  c.cmr_lambda = 1e-3
  c.cmr_omega = 1.0
  c.cmr_targets = r"llm/layers_\d+/attn/(q|k|v)_proj"
  return c
