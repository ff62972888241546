"""Half Fine-Tuning (docs/methods.md §2.4, arXiv 2404.18466): per block 2 of 4 attention matrices
and 1 or 2 of 3 FFN matrices train, drawn once from `seed` (use a new seed per sequential stage).
`projector`: half | full | frozen. `resample_every=N` (extension) redraws every N steps."""
import ml_collections
from ml_collections import config_dict


def get_config():
  c = ml_collections.ConfigDict()
  c.name = "hft"
  c.seed = 0
  c.projector = "half"
  c.resample_every = config_dict.placeholder(int)
  return c
