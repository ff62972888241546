"""Regex freezing (docs/methods.md §2.1). Default (no preset, no targets): full fine-tuning.
`--config.method.preset=` full | projector | llm | llm_last_k (with `k`) | vision | attn_only, or
`--config.method.targets='llm/layers_\\d+/attn/.*'` (not both). `frozen` regexes are checked
first (e.g. 'vision/.*' for "everything but the vision tower")."""
import ml_collections
from ml_collections import config_dict


def get_config():
  c = ml_collections.ConfigDict()
  c.name = "freeze"
  c.preset = config_dict.placeholder(str)
  c.targets = config_dict.placeholder(str)
  c.frozen = ""
  c.k = 12
  return c
