"""Evaluation metrics, one import away: token-level loss / accuracy / perplexity (here), VQA
accuracy and exact match (`vqa.py`), multiple-choice extraction (`choice.py`), BLEU and CIDEr-D
(`captions.py`).

Token metrics follow the batch convention of `mllm_tune.data.targets` (next-token, unshifted
mask): `loss_mask[b, t] = 1` means token `ids[b, t]` is a target predicted from `logits[b, t-1]`;
`loss_mask[:, 0]` must be 0. Sums are returned so that corpus values over many batches are
exact: perplexity = exp(sum nll / sum count), never a mean of per-batch perplexities.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mllm_tune.losses.token import next_token_nll
from mllm_tune.eval.captions import bleu, cider_d
from mllm_tune.eval.choice import choice_accuracy, extract_choice
from mllm_tune.eval.vqa import (exact_match, mean_vqa_accuracy, normalize_text,
                                normalize_vqa_answer, vqa_accuracy)

__all__ = ["TokenStats", "token_stats", "token_metrics", "vqa_accuracy", "mean_vqa_accuracy",
           "normalize_vqa_answer", "exact_match", "normalize_text", "extract_choice",
           "choice_accuracy", "bleu", "cider_d"]


class TokenStats(NamedTuple):
  """Summed next-token statistics over the targets of a batch (float32 scalars); add them up
  across batches with `jax.tree.map(jnp.add, a, b)` (not `a + b`: that concatenates)."""
  nll_sum: jax.Array   # sum of -log p(target)
  correct: jax.Array   # targets where argmax(logits[t-1]) == ids[t]
  count: jax.Array     # number of targets


def token_stats(logits_BTV: jax.Array, ids_BT: jax.Array, loss_mask_BT: jax.Array
                ) -> TokenStats:
  """Sums of next-token nll, argmax hits and target count over `loss_mask = 1` (jit-friendly).

  logits (B, T, V) any float dtype (computed in float32), ids (B, T) int, loss_mask (B, T) {0,1}.
  Raises eagerly (outside jit) if shapes disagree or `loss_mask[:, 0]` is nonzero.
  """
  if logits_BTV.ndim != 3 or logits_BTV.shape[:2] != ids_BT.shape:
    raise ValueError(f"logits {logits_BTV.shape} must be (B, T, V) with ids (B, T) = "
                     f"{ids_BT.shape}")
  if loss_mask_BT.shape != ids_BT.shape:
    raise ValueError(f"loss_mask shape {loss_mask_BT.shape} != ids shape {ids_BT.shape}")
  if not isinstance(loss_mask_BT, jax.core.Tracer) and np.any(np.asarray(loss_mask_BT)[:, 0]):
    raise ValueError("loss_mask[:, 0] must be 0: the first token has no logits to be predicted "
                     "from (next-token convention, see mllm_tune.data.targets)")
  mask_BT = loss_mask_BT > 0
  nll_BT = next_token_nll(logits_BTV, ids_BT, loss_mask_BT)
  pred_BT = jnp.pad(jnp.argmax(logits_BTV[:, :-1], axis=-1), ((0, 0), (1, 0)))
  hit_BT = (pred_BT == ids_BT) & mask_BT
  f32 = jnp.float32
  return TokenStats(nll_BT.sum().astype(f32), hit_BT.sum().astype(f32), mask_BT.sum().astype(f32))


def token_metrics(stats: TokenStats) -> dict[str, float]:
  """{'loss': mean nll, 'accuracy': top-1 accuracy, 'perplexity': exp(loss), 'num_tokens'}
  from (possibly accumulated) `TokenStats`; raises if there are no targets."""
  count = float(stats.count)
  if count <= 0:
    raise ValueError("no target tokens (loss_mask is all zero)")
  loss = float(stats.nll_sum) / count
  return {"loss": loss, "accuracy": float(stats.correct) / count,
          "perplexity": float(np.exp(loss)), "num_tokens": count}
