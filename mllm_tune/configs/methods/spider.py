"""SPIDER (docs/methods.md §2.5, arXiv 2411.10928): no hyperparameters of its own; the released
LLaVA-1.5 setting tunes the last 12 of 32 LLM blocks with gradients clipped at 1.0 (HF Trainer).
Use a plain (non-clipping) AdamW as the optimizer: SPIDER clips before accumulating G."""
import ml_collections
from ml_collections import config_dict


def get_config():
  c = ml_collections.ConfigDict()
  c.name = "spider"
  c.preset = config_dict.placeholder(str)  # None: the last `k` LLM blocks (llm_last_k)
  c.targets = config_dict.placeholder(str)
  c.k = 12
  c.frozen = ""
  c.max_grad_norm = config_dict.placeholder(float)
  c.max_grad_norm = 1.0
  return c
