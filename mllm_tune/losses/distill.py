"""Distillation between token distributions: tempered log-probs, per-position KL, LwF's soft
cross-entropy, the KL term of the penalties, and the position weights they are summed with.
The one per-position KL here serves the `kl` penalty, GIFT's L_KD and the in-run retention KL."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def tempered_log_probs(logits_BTV: jax.Array, temperature: float = 1.0) -> jax.Array:
  """`log softmax(logits / T)` over the vocabulary, in float32."""
  return jax.nn.log_softmax(logits_BTV.astype(jnp.float32) / temperature, -1)


def token_kl(logp_ref_BTV: jax.Array, logp_BTV: jax.Array) -> jax.Array:
  """(B, T) KL(p_ref || p) = sum_v p_ref (log p_ref - log p), from log-probs."""
  return jnp.sum(jnp.exp(logp_ref_BTV) * (logp_ref_BTV - logp_BTV), axis=-1)


def lwf_sum(student_BTV, teacher_BTV, w_BT, temperature: float = 2.0,
            t2_scale: bool = False) -> jax.Array:
  """sum_t w_t (-sum_v p0_v log q_v), p0 = softmax(z0/T) (no gradient), q = softmax(z/T)."""
  p0 = jax.nn.softmax(jax.lax.stop_gradient(teacher_BTV).astype(jnp.float32) / temperature, -1)
  logq = tempered_log_probs(student_BTV, temperature)
  ce = -jnp.sum(p0 * logq, axis=-1)
  return jnp.sum(w_BT * ce) * (temperature ** 2 if t2_scale else 1.0)


def kl_sum(student_BTV, teacher_BTV, w_BT, temperature: float = 1.0,
           direction: str = "forward", t2_scale: bool = True) -> jax.Array:
  """sum_t w_t KL(p_ref || p_theta) (forward) or KL(p_theta || p_ref) (reverse), at T."""
  logp_ref = tempered_log_probs(jax.lax.stop_gradient(teacher_BTV), temperature)
  logp = tempered_log_probs(student_BTV, temperature)
  kl = token_kl(logp_ref, logp) if direction == "forward" else token_kl(logp, logp_ref)
  return jnp.sum(w_BT * kl) * (temperature ** 2 if t2_scale else 1.0)


def distill_weights(batch: dict, tokens: str) -> jax.Array:
  """(B, T-1) float32 weights of the positions predicting token t from t-1: `supervised` =
  loss_mask[:, 1:], `all` = both tokens real (attention_mask)."""
  if tokens == "supervised":
    return batch["loss_mask"][:, 1:].astype(jnp.float32)
  am = batch.get("attention_mask", jnp.ones_like(batch["input_ids"])).astype(jnp.float32)
  return am[:, 1:] * am[:, :-1]
