"""TIES-merging (docs/methods.md §6.3, Yadav et al. 2023): keep the top k = 20% of each task vector
by
|tau| (`scope` "global": over the task's whole vector, as the paper's code; "tensor": per weight,
as peft), elect signs, disjoint mean, lam = 1 without a validation set.
Consumed by `mllm_tune.posthoc.merging.ties_merge(theta0, taus, k, lam, scope)`."""
import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.name = "ties"
  c.k = 0.2
  c.lam = 1.0
  c.scope = "global"
  return c
