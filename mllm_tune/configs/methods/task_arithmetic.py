"""Task arithmetic (docs/methods.md §6.3, Ilharco et al. 2023): `theta0 + lam * sum_k tau_k`, lam
chosen on validation from `sweep`. [choice] lam = 0.4 without a validation set (the value the
TIES paper used for task arithmetic in that setting; not re-checked); ATM uses 1 / #tasks.
Consumed by `mllm_tune.posthoc.merging.task_arithmetic(theta0, taus, lam)`."""
import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.name = "task_arithmetic"
  c.lam = 0.4
  c.sweep = tuple(i / 10 for i in range(1, 11))
  return c
