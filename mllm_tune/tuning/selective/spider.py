"""SPIDER (docs/methods.md §2.5, arXiv 2411.10928; WenkeHuang/SPIDER `Code/train/SPIDER.py`).

A weight moves only where fine-tuning importance beats pre-training importance. Per tensor (per
layer for stacked leaves, as torch has one tensor per layer):

  psi(X)  = sigmoid((|X| - mean|X|) / std|X|)   (std ddof 1; psi = 0 for an all-zero X, as the
                                                 code's `calculate_rank`; z = 0 when std = 0)
  I_pre   = psi(theta0),  G_t = G_{t-1} + g_t (clipped), I_ft = psi(G_t)
  c~      = I_ft / (I_pre + I_ft) where I_ft > I_pre else 0
  c       = min(1, c~ / mean(c~[c~ > 0]))       (0 when no entry is positive)
  theta_t = theta0 + c * (theta_{t-1} + u_t - theta0)
  => u'_t = c * u_t + (c - 1) * (theta_{t-1} - theta0)      (the optax form used here)

`spider_transform` wraps the user's optimizer because it needs both the clipped gradient g_t
and the inner update u_t (AdamW incl. decay). Its state is theta0 + G (2x the owned leaves) and
the inner state. Gradients are clipped to `max_grad_norm` (HF Trainer's clip before
`optimizer.step`, default 1.0) after zeroing entries outside the per-layer mask; the user's
inner optimizer should then not clip again. Which leaves are tuned: as `freeze` (default
`preset="llm_last_k"`, `k=12`, the released LLaVA-1.5 setting).
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mllm_tune import pytree
from mllm_tune.importance.magnitude import weight_magnitude as importance  # psi(X)
from mllm_tune.tuning.api import partial_masks, partition, register
from mllm_tune.tuning.selective.by_path import Freeze


def challenge_ratio(i_pre: jax.Array, i_ft: jax.Array, per_layer: bool) -> jax.Array:
  """c = min(1, c~ / mean(c~[c~ > 0])), c~ = I_ft / (I_pre + I_ft) where I_ft > I_pre, else 0."""
  axes = tuple(range(1, i_ft.ndim)) if per_layer else tuple(range(i_ft.ndim))
  wins = i_ft > i_pre
  c_tilde = jnp.where(wins, i_ft / jnp.where(wins, i_pre + i_ft, 1.0), 0.0)
  n_pos = jnp.sum(c_tilde > 0, axis=axes, keepdims=True)
  mean_pos = jnp.sum(c_tilde, axis=axes, keepdims=True) / jnp.maximum(n_pos, 1)
  return jnp.where(n_pos > 0, jnp.minimum(1.0, c_tilde / jnp.where(n_pos > 0, mean_pos, 1.0)),
                   0.0)


def _per_layer(path: str) -> bool:
  """`params/llm/layers/...` (a flat trainable-partition path) is stacked along axis 0."""
  return pytree.is_stacked(path.split("/", 1)[1]) if "/" in path else False


class SpiderState(NamedTuple):
  theta0: Any      # owned leaves at init, nested like the params
  grad_sum: Any    # G: running sum of clipped gradients (float32)
  inner: optax.OptState


def spider_transform(inner: optax.GradientTransformation,
                     owned: dict[str, np.ndarray | None] | None = None,
                     max_grad_norm: float | None = 1.0) -> optax.GradientTransformation:
  """Wrap `inner` with SPIDER on the `owned` leaves ({flat path: element mask or None}; None
  owns every leaf). Other leaves pass through `inner` unchanged (they are still clipped)."""
  def own(tree):
    flat = pytree.flatten(tree)
    return {p: x for p, x in flat.items() if owned is None or p in owned}

  def init(params):
    theta0 = own(params)
    return SpiderState(pytree.unflatten(theta0),
                       pytree.unflatten({p: jnp.zeros(jnp.shape(x), jnp.float32)
                                         for p, x in theta0.items()}),
                       inner.init(params))

  def update(updates, state, params=None):
    if params is None:
      raise ValueError("spider needs the current params: call update(grads, state, params)")
    flat_g = pytree.flatten(updates)
    for p, m in (owned or {}).items():
      if m is not None and p in flat_g:
        flat_g[p] = jnp.where(jnp.asarray(m), flat_g[p], jnp.zeros_like(flat_g[p]))
    grads = pytree.unflatten(flat_g)
    if max_grad_norm is not None:
      grads, _ = optax.clip_by_global_norm(max_grad_norm).update(grads, optax.EmptyState())
    u, inner_state = inner.update(grads, state.inner, params)
    flat_u, flat_p, flat_g = pytree.flatten(u), pytree.flatten(params), pytree.flatten(grads)
    theta0, g_sum = pytree.flatten(state.theta0), pytree.flatten(state.grad_sum)
    for p in theta0:
      g_sum[p] = g_sum[p] + flat_g[p].astype(jnp.float32)
      stacked = _per_layer(p)
      c = challenge_ratio(importance(theta0[p], stacked), importance(g_sum[p], stacked), stacked)
      drift = flat_p[p].astype(jnp.float32) - theta0[p].astype(jnp.float32)
      new = c * flat_u[p].astype(jnp.float32) + (c - 1.0) * drift
      flat_u[p] = new.astype(flat_u[p].dtype)
    return pytree.unflatten(flat_u), SpiderState(state.theta0, pytree.unflatten(g_sum),
                                                 inner_state)

  return optax.GradientTransformation(init, update)


@register("spider", "selective")
@dataclasses.dataclass(frozen=True)
class Spider(Freeze):
  """SPIDER on the leaves `freeze` would train (see the module docstring). Not a mergeable
  adapter: the tuned weights are the params themselves (merge = identity)."""
  default_preset: ClassVar[str] = "llm_last_k"
  max_grad_norm: float | None = 1.0

  def transform(self, variables, inner):
    mask = self.trainable(variables)
    trained, _ = partition(variables, mask)
    return spider_transform(inner, partial_masks(mask, trained), self.max_grad_norm)
