"""Post-hoc methods applied at decoding time, on generated answers.

- DaWin (Oh et al., ICLR 2025; docs/methods.md §6.2), generative VQA [choice]: H(x) = mean token
  entropy of a model over its own greedy answer (`answer_entropy`); per-sample
  `lambda(x)` from both models' entropies (offset-adjusted by default), a K = 3 Beta mixture over
  the lambdas, and each sample decoded by the merged model `(1 - m_k) theta0 + m_k theta_ft` of
  its component k (`dawin_generate`): K merged models, not one per sample.
- Open-ended logit calibration (Mai et al., NeurIPS 2024; docs/methods.md §6.4 (b)) needs no helper:
  `generate(..., first_token_logit_bias=calibration.first_token_bias(V, first_ids, gamma))`.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mllm_tune.eval.decoding import (DEFAULT_BUCKET_FLOOR, IMAGE_TABLES, special_ids,
                                    stop_id_tuple)
from mllm_tune.eval.generate import generate
from mllm_tune.posthoc import dawin
from mllm_tune.posthoc.merging import AlphaRules, Params

__all__ = ["answer_lengths", "answer_entropy", "generate_per_coefficient", "dawin_generate"]


def answer_lengths(tokens_BT: jax.Array, stop_ids: Iterable[int]) -> jax.Array:
  """(B,) int32 number of answer tokens per row: up to and including the first end token, T
  when the row has none."""
  tok = jnp.asarray(tokens_BT)
  stops = jnp.asarray(stop_id_tuple(stop_ids) or (-1,), jnp.int32)
  is_stop_BT = jnp.isin(tok, stops)
  first_B = jnp.argmax(is_stop_BT, axis=1).astype(jnp.int32)
  return jnp.where(jnp.any(is_stop_BT, axis=1), first_B + 1, tok.shape[1]).astype(jnp.int32)


def answer_entropy(model, params: Params, input_ids, attention_mask=None, pixel_values=None,
                   max_new_tokens: int = 16, *, eos_token_id: int | Sequence[int] | None = None,
                   stop_token_ids: Iterable[int] | None = None, pad_token_id: int = 0,
                   adapters=None, bucket_floor: int | None = DEFAULT_BUCKET_FLOOR,
                   first_token_logit_bias: jax.Array | None = None,
                   **image_tables) -> jax.Array:
  """(B,) float32 DaWin H(x): the mean predictive entropy (nats) of the model over its own greedy
  answer, averaged over the generated tokens up to and including the end token (all
  `max_new_tokens` when none is emitted). Entropies are `generate(..., return_entropy=True)`'s;
  `eos_token_id=None` is the checkpoint's end token, as in `generate`."""
  eos_token_id, _ = special_ids(model, eos_token_id, pad_token_id)
  tokens_BT, ent_BT = generate(model, params, input_ids, attention_mask, pixel_values,
                               max_new_tokens, eos_token_id, pad_token_id, adapters,
                               stop_token_ids=stop_token_ids, bucket_floor=bucket_floor,
                               first_token_logit_bias=first_token_logit_bias,
                               return_entropy=True, **image_tables)
  n_B = answer_lengths(tokens_BT, stop_id_tuple(eos_token_id, stop_token_ids))
  in_answer_BT = jnp.arange(tokens_BT.shape[1])[None] < n_B[:, None]
  return jnp.sum(jnp.where(in_answer_BT, ent_BT, 0.0), axis=1) / n_B.astype(jnp.float32)


def generate_per_coefficient(model, theta0: Params, theta_ft: Params, input_ids,
                             attention_mask, pixel_values, lambdas_B, max_new_tokens: int = 16,
                             *, alphas: AlphaRules | None = None,
                             **generate_kwargs) -> jax.Array:
  """(B, max_new_tokens) int32: row b decoded by `dawin_interpolate(theta0, theta_ft,
  lambdas_B[b])`, one merged model per distinct coefficient (at most K after a Beta mixture).

  [choice] Each merged model decodes the whole batch and keeps its own rows: G distinct values
  cost G full-batch decodes, but every call has the batch's shapes (no recompiles, whatever the
  grouping) and a row's answer does not depend on which rows share its cluster. `generate_kwargs`
  go to `generate` (greedy by default; `rng` is reused per group, so sampled rows are those of
  a one-batch run with the row's merged model).
  """
  if generate_kwargs.get("return_entropy"):
    raise ValueError("generate_per_coefficient returns tokens only (no return_entropy)")
  generate_kwargs.pop("return_entropy", None)
  b = np.shape(input_ids)[0]
  lam_B = np.asarray(lambdas_B, np.float64)
  if lam_B.shape != (b,) or not np.isfinite(lam_B).all():
    raise ValueError(f"lambdas must be ({b},) finite values, got shape {lam_B.shape}")
  out_BT = None
  for lam in np.unique(lam_B):
    params = dawin.dawin_interpolate(theta0, theta_ft, float(lam), alphas)
    new_BT = generate(model, params, input_ids, attention_mask, pixel_values, max_new_tokens,
                      **generate_kwargs)
    out_BT = new_BT if out_BT is None else jnp.where(jnp.asarray(lam_B == lam)[:, None],
                                                     new_BT, out_BT)
  return out_BT


def dawin_generate(model, theta0: Params, theta_ft: Params, input_ids, attention_mask=None,
                   pixel_values=None, max_new_tokens: int = 16, offset: bool = True,
                   num_components: int | None = 3, *,
                   eos_token_id: int | Sequence[int] | None = None,
                   stop_token_ids: Iterable[int] | None = None, pad_token_id: int = 0,
                   bucket_floor: int | None = DEFAULT_BUCKET_FLOOR,
                   alphas: AlphaRules | None = None,
                   entropies: tuple[jax.Array, jax.Array] | None = None,
                   **generate_kwargs) -> tuple[jax.Array, np.ndarray, dawin.BetaMixture | None]:
  """DaWin on a prompt batch (docs/methods.md §6.2): (tokens (B, max_new_tokens) int32, per-sample
  coefficients (B,) float64, the Beta mixture or None).

  1. H_0, H_ft = `answer_entropy` of theta0 and theta_ft (greedy, `max_new_tokens` tokens;
     `entropies=(H_0, H_ft)` skips this, e.g. to reuse them);
  2. lambda = `dawin_lambda_offset` (`offset=True`, statistics of this batch, B >= 2) or
     `dawin_lambda`; a `num_components`-Beta mixture replaces each lambda by its component mean
     (`num_components=None`: per-sample lambdas, one merged model per distinct value);
  3. each row decoded by its merged model (`generate_per_coefficient`, `alphas` per-module
     rules of `merging.wise_ft`; `generate_kwargs` such as `num_beams` apply to this decode).
  End-token and padding arguments apply to both the entropy and the final decodes.
  """
  shared = dict(eos_token_id=eos_token_id, stop_token_ids=stop_token_ids,
                pad_token_id=pad_token_id, bucket_floor=bucket_floor)
  # every image / position input of the prompts (mt.hf_inputs: anyres pack tables; Qwen2-VL's
  # vision ids and M-RoPE positions too) goes to every decode, the entropy passes included
  shared.update({k: generate_kwargs.pop(k) for k in IMAGE_TABLES if k in generate_kwargs})
  b = np.shape(input_ids)[0]
  if entropies is None:
    h0_B, hft_B = (answer_entropy(model, theta, input_ids, attention_mask, pixel_values,
                                  max_new_tokens, **shared) for theta in (theta0, theta_ft))
  else:
    h0_B, hft_B = entropies
    if np.shape(h0_B) != (b,) or np.shape(hft_B) != (b,):
      raise ValueError(f"entropies must be two ({b},) arrays, got {np.shape(h0_B)} and "
                       f"{np.shape(hft_B)}")
  lam_B, mixture = dawin.dawin_coefficients(h0_B, hft_B, offset, num_components)
  tokens = generate_per_coefficient(model, theta0, theta_ft, input_ids, attention_mask,
                                    pixel_values, lam_B, max_new_tokens, alphas=alphas,
                                    **shared, **generate_kwargs)
  return tokens, lam_B, mixture
