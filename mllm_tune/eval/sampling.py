"""Pure next-token selection: temperature, top-k and top-p (nucleus) filtering, then a draw.

The filters follow transformers' logits warpers in their order (temperature, then top-k, then
top-p): top-k keeps every token whose logit ties the k-th largest; top-p keeps the smallest set of
most-likely tokens whose probability mass reaches `top_p` (a token is kept when the mass strictly
before it, in descending order, is below `top_p`; the most likely token is always kept). Removed
tokens get logit -inf. All knobs may be traced scalars, so changing them does not recompile.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def check_sampling_args(temperature: float, top_k: int, top_p: float) -> None:
  """Eager validation of the sampling knobs (raises ValueError naming the bad one)."""
  if not temperature >= 0.0:
    raise ValueError(f"temperature must be >= 0 (0 means greedy), got {temperature}")
  if int(top_k) != top_k or top_k < 0:
    raise ValueError(f"top_k must be an integer >= 0 (0 disables it), got {top_k}")
  if not 0.0 < top_p <= 1.0:
    raise ValueError(f"top_p must be in (0, 1] (1 disables it), got {top_p}")


@jax.jit
def filter_logits(logits_BV: jax.Array, temperature=1.0, top_k=0, top_p=1.0) -> jax.Array:
  """float32 (B, V): `logits / temperature` with tokens outside the top-k / nucleus set to -inf.

  `temperature` must be > 0 here (the greedy case is handled by `sample_tokens`); `top_k = 0`
  and `top_p = 1` disable their filter.
  """
  x_BV = logits_BV.astype(jnp.float32) / jnp.asarray(temperature, jnp.float32)
  v = x_BV.shape[-1]
  sorted_BV = -jnp.sort(-x_BV, axis=-1)  # descending
  k = jnp.clip(jnp.asarray(top_k, jnp.int32), 1, v)
  kth_B1 = jnp.take_along_axis(sorted_BV, jnp.broadcast_to(k - 1, (x_BV.shape[0], 1)), axis=-1)
  kth_B1 = jnp.where(jnp.asarray(top_k) > 0, kth_B1, -jnp.inf)
  x_BV = jnp.where(x_BV >= kth_B1, x_BV, -jnp.inf)
  sorted_BV = jnp.where(sorted_BV >= kth_B1, sorted_BV, -jnp.inf)
  probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
  mass_before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
  n_keep_B1 = jnp.sum(mass_before_BV < jnp.asarray(top_p, jnp.float32), axis=-1, keepdims=True)
  n_keep_B1 = jnp.maximum(n_keep_B1, 1)
  cut_B1 = jnp.take_along_axis(sorted_BV, n_keep_B1 - 1, axis=-1)
  return jnp.where(x_BV >= cut_B1, x_BV, -jnp.inf)


@jax.jit
def sample_tokens(key: jax.Array, logits_BV: jax.Array, temperature=1.0, top_k=0,
                  top_p=1.0) -> jax.Array:
  """int32 (B,): one token per row drawn from `filter_logits(...)`; rows are independent.

  `temperature == 0` returns the argmax (greedy) whatever the other knobs.
  """
  greedy_B = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  temp = jnp.asarray(temperature, jnp.float32)
  safe_temp = jnp.where(temp > 0, temp, 1.0)
  filtered_BV = filter_logits(logits_BV, safe_temp, top_k, top_p)
  drawn_B = jax.random.categorical(key, filtered_BV, axis=-1).astype(jnp.int32)
  return jnp.where(temp > 0, drawn_B, greedy_B)


def entropy_from_logits(logits: jax.Array, axis: int = -1, temperature: float = 1.0) -> jax.Array:
  """Shannon entropy (nats) of `softmax(logits / temperature)` along `axis` (float32); -inf
  logits (masked options) contribute 0."""
  if not temperature > 0:
    raise ValueError(f"dawin: temperature must be > 0, got {temperature}")
  z = jnp.asarray(logits, jnp.float32) / temperature
  logp = jax.nn.log_softmax(z, axis=axis)
  p = jnp.exp(logp)
  return -jnp.sum(jnp.where(p > 0, p * logp, 0.0), axis=axis)
