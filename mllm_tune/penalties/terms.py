"""The penalties' pure math: quadratic pull, LwF soft cross-entropy, token KL, position weights."""
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


def lwf_sum(student_BTV, teacher_BTV, w_BT, temperature: float = 2.0,
            t2_scale: bool = False) -> jax.Array:
  """sum_t w_t (-sum_v p0_v log q_v), p0 = softmax(z0/T) (no gradient), q = softmax(z/T)."""
  p0 = jax.nn.softmax(jax.lax.stop_gradient(teacher_BTV).astype(jnp.float32) / temperature, -1)
  logq = jax.nn.log_softmax(student_BTV.astype(jnp.float32) / temperature, -1)
  ce = -jnp.sum(p0 * logq, axis=-1)
  return jnp.sum(w_BT * ce) * (temperature ** 2 if t2_scale else 1.0)


def kl_sum(student_BTV, teacher_BTV, w_BT, temperature: float = 1.0,
           direction: str = "forward", t2_scale: bool = True) -> jax.Array:
  """sum_t w_t KL(p_ref || p_theta) (forward) or KL(p_theta || p_ref) (reverse), at T."""
  logp_ref = jax.nn.log_softmax(
      jax.lax.stop_gradient(teacher_BTV).astype(jnp.float32) / temperature, -1)
  logp = jax.nn.log_softmax(student_BTV.astype(jnp.float32) / temperature, -1)
  if direction == "forward":
    kl = jnp.sum(jnp.exp(logp_ref) * (logp_ref - logp), axis=-1)
  else:
    kl = jnp.sum(jnp.exp(logp) * (logp - logp_ref), axis=-1)
  return jnp.sum(w_BT * kl) * (temperature ** 2 if t2_scale else 1.0)


def distill_weights(batch: dict, tokens: str) -> jax.Array:
  """(B, T-1) float32 weights of the positions predicting token t from t-1: `supervised` =
  loss_mask[:, 1:], `all` = both tokens real (attention_mask)."""
  if tokens == "supervised":
    return batch["loss_mask"][:, 1:].astype(jnp.float32)
  am = batch.get("attention_mask", jnp.ones_like(batch["input_ids"])).astype(jnp.float32)
  return am[:, 1:] * am[:, :-1]
