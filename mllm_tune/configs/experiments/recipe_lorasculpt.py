"""LoRASculpt + EWC + WiSE-FT on the offline benchmark: sparse LoRA updates with the Conflict
Mitigation Regularizer (docs/methods.md §4), an EWC penalty whose Fisher is taken on the first
training batches (docs/methods.md §5.1), then WiSE-FT (docs/methods.md §6.1) between θ0 and the
merged model at the alpha of `posthoc.sweep` that is best by O = E + F on the eval sets. The report
lists the trade-off before and after the post-hoc step."""
from mllm_tune.configs.experiments import offline_recipe


def get_config():
  return offline_recipe.get_config(
      "lorasculpt", penalty=dict(name="ewc", weight=1e4, fisher_samples=256, fisher_chunk=8),
      posthoc=dict(name="wise_ft", sweep=(0.25, 0.5, 0.75, 1.0)))
