"""Gradient top-k / FISH mask (docs/methods.md §2.8, Sung et al. 2021): keep the top 0.5% of the
candidate entries by empirical Fisher (per-sample squared gradients; paper: 1024 samples with
ground-truth labels); `kind=grad_abs` sums |batch gradients| instead. The mask is computed
before training with `method.prepare(loss_fn, variables, batches)`."""
import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.name = "grad_topk"
  c.density = 0.005
  c.targets = r"llm/.*|projector/.*"
  c.kind = "fisher"
  return c
