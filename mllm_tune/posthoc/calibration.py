"""Post-hoc logit calibration (Mai et al., NeurIPS 2024, "Fine-Tuning is Fine, if Calibrated";
OSU-MLB/Fine-Tuning-Is-Fine-If-Calibrated `py/util/evaluate.py`), docs/methods.md §6.4.

Fine-tuning on a subset S of the classes leaves the absent classes U mostly intact up to a logit
offset, so add it back: `z'_c = z_c + gamma` for c in U. ALG ("average logit gap", the code's
`evaluate_baseline_calibration`), on labelled data (here: the tuning train split):
  gamma = mean_n[ mean_{c in S, c != y_n} z_{n,c} ] - mean_n[ mean_{c in U} z_{n,c} ].
Generative VQA [choice]: (a) closed set / multiple choice: score candidate answers by
length-normalised log-likelihood (`candidate_scores`), treat them as the classes, add gamma to
answers unseen in tuning; (b) open-ended (heuristic, reported separately): add gamma at decoding
step 1 to tokens that never start a tuning answer (`first_token_bias`).
"""
from __future__ import annotations

from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np

from mllm_tune.losses import token as losses_token


def _seen_NC(seen_mask, n: int, c: int) -> np.ndarray:
  seen = np.asarray(seen_mask)
  if seen.dtype != bool:
    raise ValueError(f"calibration: seen/unseen masks must be bool, got {seen.dtype}")
  if seen.shape not in ((c,), (n, c)):
    raise ValueError(f"calibration: mask shape {seen.shape} fits neither (C,) = ({c},) nor "
                     f"(N, C) = ({n}, {c})")
  return np.broadcast_to(seen, (n, c))


def alg_gamma(logits_NC: jax.Array, labels_N: jax.Array, seen_mask: jax.Array) -> jax.Array:
  """ALG offset gamma (float32 scalar): mean over samples of the mean logit of the wrong seen
  classes (S minus y_n) minus mean over samples of the mean unseen-class logit.

  `seen_mask` is (C,) bool, or (N, C) when each row has its own candidate set (multiple choice);
  then each mean runs over the rows where its class set is non-empty. Labels may be unseen
  classes (then every seen class is wrong, as the reference code).
  """
  z = jnp.asarray(logits_NC, jnp.float32)
  if z.ndim != 2:
    raise ValueError(f"calibration: logits must be (N, C), got shape {z.shape}")
  n, c = z.shape
  labels = np.asarray(labels_N)
  if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"calibration: labels must be ({n},) integers, got {labels.shape} "
                     f"{labels.dtype}")
  if labels.size and (labels.min() < 0 or labels.max() >= c):
    raise ValueError(f"calibration: labels must be in [0, {c}), got range "
                     f"[{labels.min()}, {labels.max()}]")
  seen = _seen_NC(seen_mask, n, c)
  wrong = seen & (np.arange(c)[None] != labels[:, None])
  unseen = ~seen
  rows_w, rows_u = wrong.any(1), unseen.any(1)
  if not rows_w.any():
    raise ValueError("calibration: ALG needs a seen class other than the label (|S| >= 2)")
  if not rows_u.any():
    raise ValueError("calibration: no unseen class: nothing to calibrate")
  def row_mean(m):
    m = jnp.asarray(m, jnp.float32)
    return jnp.sum(z * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)
  return (jnp.mean(row_mean(wrong)[rows_w]) - jnp.mean(row_mean(unseen)[rows_u]))


def calibrate(logits: jax.Array, unseen_mask: jax.Array, gamma: float) -> jax.Array:
  """`z + gamma * unseen`: logits (..., C) with gamma added to the unseen classes; the mask is
  bool and broadcasts against the logits ((C,) or (N, C))."""
  z = jnp.asarray(logits)
  m = np.asarray(unseen_mask)
  if m.dtype != bool:
    raise ValueError(f"calibration: unseen mask must be bool, got {m.dtype}")
  try:
    np.broadcast_shapes(m.shape, z.shape)
  except ValueError as e:
    raise ValueError(f"calibration: unseen mask {m.shape} does not broadcast to logits "
                     f"{z.shape}") from e
  if m.shape[-1:] != z.shape[-1:]:
    raise ValueError(f"calibration: unseen mask {m.shape} and logits {z.shape} disagree on C")
  return z + jnp.where(jnp.asarray(m), jnp.asarray(gamma, z.dtype), jnp.zeros((), z.dtype))


def token_logprobs(logits_BTV: jax.Array, targets_BT: jax.Array) -> jax.Array:
  """(B, T) float32 `log softmax(logits)[b, t, targets[b, t]]`: logits_BTV[:, t] must be the
  prediction of targets_BT[:, t] (already shifted by one)."""
  if np.ndim(logits_BTV) != 3 or np.shape(targets_BT) != np.shape(logits_BTV)[:2]:
    raise ValueError(f"calibration: token_logprobs needs logits (B, T, V) and targets (B, T), "
                     f"got {np.shape(logits_BTV)} and {np.shape(targets_BT)}")
  return losses_token.token_logprobs(logits_BTV, targets_BT)


def candidate_scores(logprobs_NKT: jax.Array, mask_NKT: jax.Array) -> jax.Array:
  """(N, K) length-normalised log-likelihood of K candidate answers per question:
  `sum_t mask * log p / sum_t mask` over each candidate's answer tokens (from `token_logprobs`);
  -inf for a candidate without tokens (never picked)."""
  lp = jnp.asarray(logprobs_NKT, jnp.float32)
  if lp.ndim != 3 or np.shape(mask_NKT) != lp.shape:
    raise ValueError(f"calibration: candidate_scores needs log-probs and mask shaped (N, K, T), "
                     f"got {lp.shape} and {np.shape(mask_NKT)}")
  m = jnp.asarray(mask_NKT, jnp.float32)
  length = jnp.sum(m, axis=-1)
  total = jnp.sum(jnp.where(m > 0, lp, 0.0) * m, axis=-1)
  return jnp.where(length > 0, total / jnp.maximum(length, 1.0), -jnp.inf)


def first_token_bias(vocab_size: int, tuning_answer_first_token_ids: Iterable[int],
                     gamma: float) -> jax.Array:
  """(V,) float32 bias for decoding step 1: gamma on every token that never starts a tuning
  answer, 0 on those that do (the open-ended heuristic of docs/methods.md §6.4 (b))."""
  if int(vocab_size) != vocab_size or vocab_size < 1:
    raise ValueError(f"calibration: vocab_size must be an integer >= 1, got {vocab_size}")
  ids = np.asarray(list(tuning_answer_first_token_ids), np.int64).reshape(-1)
  if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
    raise ValueError(f"calibration: token ids must be in [0, {vocab_size}), got range "
                     f"[{ids.min()}, {ids.max()}]")
  if not np.isfinite(gamma):
    raise ValueError(f"calibration: gamma must be finite, got {gamma}")
  bias = np.full((int(vocab_size),), gamma, np.float32)
  bias[ids] = 0.0
  return jnp.asarray(bias)


__all__ = ["alg_gamma", "calibrate", "token_logprobs", "candidate_scores", "first_token_bias"]
