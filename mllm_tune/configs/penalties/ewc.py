"""EWC (docs/methods.md §5.1): (lambda/2) sum F (w - theta0)^2 with the diagonal empirical Fisher of
512 samples. lambda has no transferable default: sweep 1e0 ... 1e6 by decades. For a reusable
Fisher beside the base: `--config.penalty.fisher_path=auto`; general data instead of the
training batches: `--config.penalty.fisher_data=llava_json --config.penalty.fisher_json_path=..`."""
from mllm_tune.configs import base


def get_config():
  c = base.get_config().penalty
  c.name = "ewc"
  c.weight = 1e3
  c.fisher_kind = "empirical"   # empirical | true (sampled labels)
  c.fisher_samples = 512
  return c
