"""VeRA: shared frozen random projections, tiny trainable per-layer vectors (docs/methods.md §4.5).

torch: `y = W0 x + b ⊙ (B_sl (d ⊙ (A_sl x)))` with one shared `A_sh (r, D_in)`, `B_sh (D_out, r)`
(D = max over targets), `A_sl = A_sh[:, :d_in]`, `B_sl = B_sh[:d_out]`. Kaiming-uniform init with
gain sqrt(2) (bound sqrt(6 / shape[1])), drawn from `projection_prng_key` with JAX's PRNG (so it
differs from torch's: exports always carry the projections, peft `save_projection=True`).
Trainable: `d (r,)` (init `d_initial`) and `b (d_out,)` (init 0). Each targeted Linear stores its
slices as constants `vera_a (d_in, r)`, `vera_b (r, d_out)` beside `vera_d`, `vera_bvec`.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from mllm_tune.models.adapters import LORA_DROPOUT, VERA_A, VERA_B, VERA_BVEC, VERA_D
from mllm_tune import pytree
from mllm_tune.tuning.api import Method, register
from mllm_tune.tuning.reparam.lora import (DEFAULT_TARGETS, adapter_path, get_leaf,
                                           resolve_targets)


def kaiming_uniform(rng, shape_torch: tuple[int, int]) -> np.ndarray:
  bound = math.sqrt(6.0 / shape_torch[1])
  return np.asarray(jax.random.uniform(rng, shape_torch, jnp.float32, -bound, bound))


@register("vera", "reparameterization")
@dataclasses.dataclass(frozen=True)
class VeRA(Method):
  rank: int = 256
  d_initial: float = 0.1
  dropout: float = 0.0
  targets: str | tuple[str, ...] = DEFAULT_TARGETS
  projection_prng_key: int = 0

  def shared_projections(self, params) -> tuple[np.ndarray, np.ndarray]:
    """(A_sh (r, D_in), B_sh (D_out, r)) in torch layout, from `projection_prng_key`."""
    shapes = [np.shape(get_leaf(params, p))[-2:] for p in resolve_targets(params, self.targets)]
    d_in, d_out = max(s[0] for s in shapes), max(s[1] for s in shapes)
    ka, kb = jax.random.split(jax.random.key(self.projection_prng_key))
    return kaiming_uniform(ka, (self.rank, d_in)), kaiming_uniform(kb, (d_out, self.rank))

  def init(self, rng, params):
    del rng
    a_sh, b_sh = self.shared_projections(params)
    return pytree.unflatten(self._adapters(params, a_sh, b_sh))

  def _adapters(self, params, a_sh, b_sh, d=None, bvec=None) -> dict:
    out = {}
    for path, flags in resolve_targets(params, self.targets).items():
      *lead, d_in, d_out = np.shape(get_leaf(params, path))
      a = np.broadcast_to(a_sh[:, :d_in].T, (*lead, d_in, self.rank))
      b = np.broadcast_to(b_sh[:d_out].T, (*lead, self.rank, d_out))
      out[adapter_path(path, VERA_A)] = jnp.asarray(a, jnp.float32)
      out[adapter_path(path, VERA_B)] = jnp.asarray(b, jnp.float32)
      dv = (d[path] if d is not None and path in d
            else np.full((*lead, self.rank), self.d_initial, np.float32))
      if lead:  # untargeted layers of a stacked module contribute nothing
        dv = dv * np.asarray(flags, np.float32)[:, None]
      out[adapter_path(path, VERA_D)] = jnp.asarray(dv, jnp.float32)
      bv = np.zeros((*lead, d_out), np.float32) if bvec is None or path not in bvec else bvec[path]
      out[adapter_path(path, VERA_BVEC)] = jnp.asarray(bv, jnp.float32)
      if self.dropout:
        out[adapter_path(path, LORA_DROPOUT)] = jnp.asarray(
            np.where(flags, self.dropout, 0.0).astype(np.float32))
    return out

  def trainable(self, variables):
    flat = pytree.flatten(super().trainable(variables))
    for path, flags in resolve_targets(variables["params"], self.targets).items():
      for leaf in (VERA_D, VERA_BVEC):
        flat["adapters/" + adapter_path(path, leaf)] = pytree.layer_mask(
            flags, 2 if flags.ndim else 1)
    return pytree.unflatten(flat)

  def merge(self, variables):
    params = pytree.flatten(variables["params"])
    ad = pytree.flatten(variables["adapters"])
    for path in resolve_targets(variables["params"], self.targets):
      get = lambda n: jnp.asarray(ad[adapter_path(path, n)], jnp.float32)
      delta = jnp.matmul(get(VERA_A) * get(VERA_D)[..., None, :], get(VERA_B))
      delta = delta * get(VERA_BVEC)[..., None, :]
      params[path] = (jnp.asarray(params[path], jnp.float32) + delta).astype(params[path].dtype)
    return pytree.unflatten(params)
