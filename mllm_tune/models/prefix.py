"""Virtual key/values of prefix tuning: peft's flat prefix layout, its reparameterization MLP, and
prepending always-visible virtual keys to an attention call (docs/methods.md §3.4)."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def prepend_prefix(k_BSKH: jax.Array, v_BSKH: jax.Array, mask_BTS: jax.Array,
                   prefix_k_NnKH: jax.Array, prefix_v_NnKH: jax.Array):
  """Always-visible virtual key/values (N = B or 1, no RoPE) before the sequence's (docs/methods.md
  §3.4)."""
  b, t = mask_BTS.shape[:2]
  n = prefix_k_NnKH.shape[1]
  grow = lambda p, x: jnp.concatenate(
      [jnp.broadcast_to(p.astype(x.dtype), (b,) + p.shape[1:]), x], axis=1)
  mask = jnp.concatenate([jnp.ones((b, t, n), bool), mask_BTS.astype(bool)], axis=-1)
  return grow(prefix_k_NnKH, k_BSKH), grow(prefix_v_NnKH, v_BSKH), mask


def split_prefix(prefix_nX: jax.Array, num_layers: int) -> tuple[jax.Array, jax.Array]:
  """peft's flat prefix (n, 2 L t) -> per-layer keys, values (L, n, t) each.

  peft views it as [n, 2L, K, H]: index 2l holds the keys of layer l, 2l+1 its values
  (docs/methods.md §3.4).
  """
  n = prefix_nX.shape[0]
  p = prefix_nX.reshape(n, num_layers, 2, -1).transpose(1, 2, 0, 3)  # (L, 2, n, t)
  return p[:, 0], p[:, 1]


def join_prefix(k_LnT: jax.Array, v_LnT: jax.Array) -> jax.Array:
  """Inverse of `split_prefix`: (L, n, t) keys and values -> peft's (n, 2 L t)."""
  num_layers, n = k_LnT.shape[:2]
  kv = jnp.stack([k_LnT.reshape(num_layers, n, -1), v_LnT.reshape(num_layers, n, -1)], axis=1)
  return kv.transpose(2, 0, 1, 3).reshape(n, -1)


def prefix_mlp(embedding_nT, w1_TH, b1_H, w2_HX, b2_X) -> jax.Array:
  """Prefix reparameterization `P = tanh(E W1 + b1) W2 + b2` (n, 2 L t) (docs/methods.md §3.4)."""
  return jnp.matmul(jnp.tanh(jnp.matmul(embedding_nT, w1_TH) + b1_H), w2_HX) + b2_X
