"""LoRASculpt (CVPR 2025, arXiv 2503.16843): sparse LoRA factors + Conflict Mitigation
Regularizer (docs/methods.md §4.6, checked against the released LoRASculpt_Trainer).

* Sparse update ("factors", the released code): at optimizer step `t0` each factor P (A and B of
  every layer separately) keeps its top-k entries by |P|, `k = floor(rho * numel(P))`, the rest
  are zeroed; the mask is fixed and re-applied after every later update:
  `u' = M ⊙ (θ + u) − θ` from `t0` on. The density of `A B` is then about
  `1 − (1 − rho_A rho_B)^r` (not rho).
* CMR on every LoRA-wrapped q/k/v projection: `P = K0 / ||K0||_F`, `S = |1 / ln(|P| + 1e-15)|`,
  `M = tanh(ω S)` (constant), `L_CMR = (1/N_mod) Σ ||M ⊙ (A B)||_F` (unsquared, without the LoRA
  scale); the loss gets `λ L_CMR`. The connector "soft sparsity" term of paper summaries is not in
  the released code and is not implemented.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mllm_tune.models.adapters import LORA_A, LORA_B
from mllm_tune import pytree
from mllm_tune.importance.magnitude import cmr_weight
from mllm_tune.tuning.api import MethodError, register
from mllm_tune.tuning.reparam.lora import (ALL_LLM_LINEARS, LoRA, adapter_path, get_leaf,
                                           resolve_targets)

CMR_TARGETS = r"llm/layers_\d+/attn/(q|k|v)_proj"


def topk_mask(x: jax.Array, rho: float, stacked: bool) -> jax.Array:
  """Bool mask of the top `floor(rho * numel)` |x| entries, per layer when `stacked`."""
  lead = x.shape[:1] if stacked else (1,)
  flat = jnp.abs(x).reshape(lead + (-1,))
  k = int(math.floor(rho * flat.shape[1]))
  if k <= 0:
    return jnp.zeros(x.shape, bool)
  _, idx = jax.lax.top_k(flat, k)
  mask = jnp.zeros(flat.shape, bool).at[jnp.arange(flat.shape[0])[:, None], idx].set(True)
  return mask.reshape(x.shape)


class SculptState(NamedTuple):
  count: jax.Array
  masks: dict
  inner: optax.OptState


@register("lorasculpt", "reparameterization")
@dataclasses.dataclass(frozen=True)
class LoRASculpt(LoRA):
  rank: int = 32
  alpha: float = 64.0
  dropout: float = 0.05
  targets: str | tuple[str, ...] = ALL_LLM_LINEARS
  rho: float = 0.1            # kept fraction of each factor (the "target density")
  t0: int = 100               # optimizer step at which the factors are sparsified
  sparsify: str = "factors"   # the released code; BA-level sparsification is not implemented
  cmr_lambda: float = 1e-3
  cmr_omega: float = 1.0
  cmr_targets: str = CMR_TARGETS
  patterns_supported: ClassVar[bool] = False  # the density and CMR assume one rank
  experts_supported: ClassVar[bool] = False
  embeddings_supported: ClassVar[bool] = False
  bias_supported: ClassVar[bool] = False

  def __post_init__(self):
    super().__post_init__()
    if not 0.0 < self.rho <= 1.0:
      raise MethodError(f"lorasculpt: rho must be in (0, 1], got {self.rho}")
    if self.sparsify != "factors":
      raise MethodError("lorasculpt: only sparsify='factors' (the released code) is supported")

  def transform(self, variables, inner):
    rho, t0 = self.rho, self.t0
    factor_keys = sorted("adapters/" + adapter_path(p, leaf)
                         for p in resolve_targets(variables["params"], self.targets)
                         for leaf in (LORA_A, LORA_B))

    def init(params):
      flat = pytree.flatten(params)
      masks = {k: jnp.ones(flat[k].shape, bool) for k in factor_keys if k in flat}
      return SculptState(jnp.zeros((), jnp.int32), masks, inner.init(params))

    def update(grads, state, params=None):
      if params is None:
        raise MethodError("lorasculpt's optimizer needs params (optax update(..., params))")
      updates, inner_state = inner.update(grads, state.inner, params)
      flat_u, flat_p = pytree.flatten(updates), pytree.flatten(params)
      masks = {}
      for k, old_mask in state.masks.items():
        new_val = flat_p[k] + flat_u[k]
        stacked = pytree.is_stacked(k.split("/", 1)[1])
        mask = jax.lax.cond(state.count == t0, lambda v: topk_mask(v, rho, stacked),
                            lambda v: old_mask, new_val)
        masks[k] = mask
        sparse_u = jnp.where(mask, new_val, 0.0) - flat_p[k]
        flat_u[k] = jnp.where(state.count >= t0, sparse_u, flat_u[k])
      return pytree.unflatten(flat_u), SculptState(state.count + 1, masks, inner_state)

    return optax.GradientTransformation(init, update)

  needs_logits: ClassVar[bool] = False  # the CMR reads the adapters only

  def loss_terms(self, variables, batch, logits):
    del batch, logits
    params, ad = variables["params"], pytree.flatten(variables["adapters"])
    total, n_mod = 0.0, 0
    rx = re.compile(self.cmr_targets)
    module = lambda path, i: pytree.logical_path(path, i).rsplit("/", 1)[0]
    for path, flags in resolve_targets(params, self.targets).items():
      if flags.ndim:
        layer_on = np.asarray([bool(f and rx.fullmatch(module(path, i)))
                               for i, f in enumerate(flags)])
      else:
        layer_on = np.asarray(bool(rx.fullmatch(module(path, None))))
      if not layer_on.any():
        continue
      m = cmr_weight(get_leaf(params, path), self.cmr_omega)
      ab = jnp.matmul(ad[adapter_path(path, LORA_A)], ad[adapter_path(path, LORA_B)])
      norms = jnp.sqrt(jnp.sum(jnp.square(m * ab), axis=(-2, -1)) + 1e-30)
      total = total + jnp.sum(jnp.where(jnp.asarray(layer_on), norms, 0.0))
      n_mod += int(np.sum(layer_on))
    if n_mod == 0:
      raise MethodError(f"lorasculpt: cmr_targets {self.cmr_targets!r} match no LoRA module")
    return {"cmr": self.cmr_lambda * total / n_mod}
