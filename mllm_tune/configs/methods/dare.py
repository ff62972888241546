"""DARE (docs/methods.md §6.3, Yu et al. 2024): drop each task-vector entry with p = 0.9, rescale by
1 / (1 - p), then merge (`merge` = task_arithmetic with `lam`, or ties). Consumed by
`mllm_tune.posthoc.merging.dare_merge(theta0, taus, p, key=jax.random.key(seed), merge, lam=lam)`."""
import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.name = "dare"
  c.p = 0.9
  c.seed = 0
  c.merge = "task_arithmetic"
  c.lam = 1.0
  return c
