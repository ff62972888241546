"""Model Tailor (docs/methods.md §2.6, ICML 2024, arXiv 2402.12048), post-hoc: keep a 10% patch of
the fine-tuned weights (sparsity 0.9) per 128-column block, score 0.8 salience + 0.2 sensitivity,
damp 0.01, 128 target-task calibration samples, projector reset to theta0. `compensation_sign`
-1 is OBS/SparseGPT; +1 reproduces the released code."""
import ml_collections
from ml_collections import config_dict


def get_config():
  c = ml_collections.ConfigDict()
  c.name = "model_tailor"
  c.sparsity = 0.9
  c.block_size = 128
  c.damp = 0.01
  c.salience_weight = 0.8
  c.sensitivity_weight = 0.2
  c.compensation_sign = -1.0
  c.compensate = True
  c.layers = config_dict.placeholder(tuple)
  c.reset_projector = True
  c.num_samples = 128
  return c
