"""Magnitude importance scores: SPIDER's psi(|X|) and LoRASculpt's CMR weight (the selective and
reparameterization methods read them from here)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def weight_magnitude(x: jax.Array, per_layer: bool = False) -> jax.Array:
  """SPIDER's psi(X) = sigmoid(standardized |X|) (`spider.importance`), statistics over the
  whole tensor or, with `per_layer`, over axes 1.. (float32)."""
  a = jnp.abs(jnp.asarray(x, jnp.float32))
  axes = tuple(range(1, a.ndim)) if per_layer else tuple(range(a.ndim))
  n = int(np.prod([a.shape[i] for i in axes], dtype=np.int64))
  mean = jnp.mean(a, axis=axes, keepdims=True)
  std = jnp.sqrt(jnp.sum((a - mean) ** 2, axis=axes, keepdims=True) / max(n - 1, 1))
  safe = jnp.where(std > 0, std, 1.0)
  z = jnp.where(std > 0, (a - mean) / safe, 0.0)
  all_zero = jnp.all(a == 0, axis=axes, keepdims=True)
  return jnp.where(all_zero, 0.0, jax.nn.sigmoid(z))


def cmr_weight(k0: jax.Array, omega: float = 1.0) -> jax.Array:
  """LoRASculpt's CMR weight `tanh(ω |1 / ln(|K0| / ||K0||_F + 1e-15)|)` per layer (Frobenius
  norm over the last 2 axes)."""
  k0 = jnp.asarray(k0, jnp.float32)
  fro = jnp.sqrt(jnp.sum(k0 * k0, axis=(-2, -1), keepdims=True))
  s = jnp.abs(1.0 / jnp.log(jnp.abs(k0 / fro) + 1e-15))
  return jax.lax.stop_gradient(jnp.tanh(omega * s))
