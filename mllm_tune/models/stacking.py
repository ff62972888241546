"""Layer stacks: a block class stacked along a leading axis and run with `nn.scan`, optionally
rematerialized (`remat_policy`). Used by the LLM and every vision / text tower."""
from __future__ import annotations

import jax
from flax import linen as nn

from mllm_tune.losses.router import MOE_STATS
from mllm_tune.models.adapters import ADAPTERS


REMAT_POLICIES = {
    "full": None,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
}


def rematted(block_cls, remat_policy: str):
  if remat_policy == "none":
    return block_cls
  if remat_policy not in REMAT_POLICIES:
    raise ValueError(f"remat_policy '{remat_policy}' unknown; choose from none, "
                     f"{', '.join(REMAT_POLICIES)}")
  return nn.remat(block_cls, policy=REMAT_POLICIES[remat_policy], prevent_cse=False)


def scanned(block_cls, num_layers: int, remat_policy: str, n_broadcast: int, unroll: int = 1,
            n_trailing: int = 0):
  """Stack `block_cls` along a leading axis and run it with `nn.scan` (optionally rematted):
  `n_broadcast` broadcast arguments, the scanned one, then `n_trailing` broadcast arguments.
  `unroll` layers run per loop iteration (`lax.scan`'s unroll). The parameter layout is the
  same for every `unroll`."""
  return nn.scan(rematted(block_cls, remat_policy),
                 variable_axes={"params": 0, ADAPTERS: 0, "intermediates": 0, MOE_STATS: 0},
                 split_rngs={"params": True, "dropout": True},
                 in_axes=(nn.broadcast,) * n_broadcast + (0,) + (nn.broadcast,) * n_trailing,
                 length=num_layers,
                 unroll=max(1, min(unroll, num_layers)))
