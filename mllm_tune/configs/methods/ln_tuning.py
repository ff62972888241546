"""LayerNorm tuning (docs/methods.md §2.3, Zhao et al. 2023): the LLM norm scales, (2L+1)·d params.
`--config.method.preset=ln_paper` also trains the projector, embeddings and LM head (peft's
LN_TUNING llava default). PEFT export: LN_TUNING."""
import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.name = "ln_tuning"
  c.preset = "ln_only"
  return c
