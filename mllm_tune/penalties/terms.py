"""The quadratic pull of the EWC / MAS / L2-SP penalties (the distillation terms are in
`mllm_tune/losses/distill.py`)."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def quadratic(w: jax.Array, anchor: jax.Array, importance: jax.Array | None,
              coef: float) -> jax.Array:
  """coef * sum importance * (w - anchor)^2 in float32 (importance None: 1)."""
  d = jnp.asarray(w, jnp.float32) - jnp.asarray(anchor, jnp.float32)
  sq = d * d if importance is None else jax.lax.stop_gradient(
      jnp.asarray(importance, jnp.float32)) * d * d
  return coef * jnp.sum(sq)
