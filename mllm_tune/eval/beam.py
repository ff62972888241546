"""Beam search with a KV cache, compiled; step semantics of transformers' (>= 4.50) vectorized
`_beam_search` with `do_sample=False`, so results match HF `generate(num_beams=K)`.

Per step, for each batch row (K beams, V tokens, E end tokens):
1. scores `run_score[k] + log_softmax(logits[k])` over all K*V continuations; keep the top
   C = max(2, 1 + E) * K (C > K so K non-finished candidates always remain).
2. a candidate "hits" if its token is an end token or it reaches `max_new_tokens`.
3. running beams: the best K candidates that did not hit.
4. finished hypotheses: candidates among the top K of step 1 that hit enter a K-slot pool with
   score `sum_logprobs / new_len ** length_penalty` (new_len includes the end token); the pool
   keeps its K best. No entry is added once the row is done (early_stopping=True and K
   finished) or the early-stop heuristic says no improvement is possible.
5. stop when no row can improve (heuristic below), or every row has K finished hypotheses and
   early_stopping=True, or every candidate hit (max length).
Heuristic (HF `_check_early_stop_heuristic`): a row can still improve while some pool slot is
empty or `best_running / L ** length_penalty > worst_finished`, with L the current length
(early_stopping False or True) or `max_new_tokens` ("never" with `length_penalty > 0`).

The prompt is prefilled once per row, then its cache is repeated for the K beams; each step
gathers the cache rows of the surviving beams' parents (one cache copy per token, as HF's
`reorder_cache`).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from mllm_tune.eval.decoding import decode_step, prefill
from mllm_tune.models.kv_cache import unstack_layers

NEG = -1.0e9  # HF's "impossible" score offset (float32 arithmetic as in HF)
EARLY_STOPPING_CODES = {False: 0, True: 1, "never": 2}  # traced, so modes share one compile


def early_stopping_code(early_stopping: bool | str) -> int:
  for key, code in EARLY_STOPPING_CODES.items():
    if early_stopping is key or (isinstance(key, str) and early_stopping == key):
      return code
  raise ValueError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")


class BeamState(NamedTuple):
  run_seq_BKN: jax.Array     # int32 tokens of the running beams
  run_score_BK: jax.Array    # float32 summed log-probs, best first
  fin_seq_BKN: jax.Array     # int32 finished hypotheses
  fin_score_BK: jax.Array    # float32 length-penalized scores, best first
  fin_done_BK: jax.Array     # bool: pool slot holds a real finished hypothesis
  improvable_B1: jax.Array   # bool: the early-stop heuristic still allows improvement


def init_state(b: int, k: int, n: int, pad_id) -> BeamState:
  seq = jnp.full((b, k, n), pad_id, jnp.int32)
  run_score = jnp.full((b, k), NEG, jnp.float32).at[:, 0].set(0.0)  # only beam 0 live at start
  return BeamState(seq, run_score, seq, jnp.full((b, k), NEG, jnp.float32),
                   jnp.zeros((b, k), bool), jnp.ones((b, 1), bool))


def _gather(x_BC, idx_BK):
  """Select along axis 1 (beams) for every batch row; works for (B, C) and (B, C, N)."""
  idx = idx_BK.reshape(idx_BK.shape + (1,) * (x_BC.ndim - 2))
  return jnp.take_along_axis(x_BC, idx, axis=1)


def beam_step(logp_BKV: jax.Array, st: BeamState, t, limit, stop_ids_E: jax.Array,
              length_penalty, early_code):
  """One pure beam-search step choosing new token t (0-based) from log-probs (B, K, V).

  `limit` is max_new_tokens; `early_code` is `early_stopping_code(early_stopping)`.

  Returns (new state, parent beam (B, K) int32, new token (B, K) int32, continue flag ()).
  """
  b, k, v = logp_BKV.shape
  n_keep = max(2, 1 + stop_ids_E.shape[0]) * k
  early_true = early_code == EARLY_STOPPING_CODES[True]
  acc_BC = (logp_BKV + st.run_score_BK[..., None]).reshape(b, k * v)
  top_score_BC, top_idx_BC = jax.lax.top_k(acc_BC, n_keep)
  parent_BC = (top_idx_BC // v).astype(jnp.int32)
  tok_BC = (top_idx_BC % v).astype(jnp.int32)
  cand_seq_BCN = _gather(st.run_seq_BKN, parent_BC)
  cand_seq_BCN = jax.lax.dynamic_update_slice(cand_seq_BCN, tok_BC[..., None], (0, 0, t))
  is_stop_BC = jnp.isin(tok_BC, stop_ids_E) if stop_ids_E.shape[0] else jnp.zeros_like(tok_BC,
                                                                                      bool)
  hits_BC = is_stop_BC | (t + 1 >= limit)

  # 3. running beams for the next step
  run_cand_BC = top_score_BC + hits_BC.astype(jnp.float32) * NEG
  _, next_BK = jax.lax.top_k(run_cand_BC, k)
  run_seq = _gather(cand_seq_BCN, next_BK)
  run_score = _gather(run_cand_BC, next_BK)
  parent_BK, tok_BK = _gather(parent_BC, next_BK), _gather(tok_BC, next_BK)

  # 4. finished pool
  just_done_BC = hits_BC & (jnp.arange(n_keep) < k)[None]
  new_len = (t + 1).astype(jnp.float32)
  fin_cand_BC = top_score_BC / new_len ** length_penalty
  row_full_B1 = jnp.all(st.fin_done_BK, axis=-1, keepdims=True) & early_true
  fin_cand_BC += row_full_B1.astype(jnp.float32) * NEG
  fin_cand_BC += (~st.improvable_B1).astype(jnp.float32) * NEG
  fin_cand_BC += (~just_done_BC).astype(jnp.float32) * NEG
  merged_score = jnp.concatenate([st.fin_score_BK, fin_cand_BC], axis=1)
  _, keep_BK = jax.lax.top_k(merged_score, k)
  fin_seq = _gather(jnp.concatenate([st.fin_seq_BKN, cand_seq_BCN], axis=1), keep_BK)
  fin_score = _gather(merged_score, keep_BK)
  fin_done = _gather(jnp.concatenate([st.fin_done_BK, just_done_BC], axis=1), keep_BK)

  # 5. stopping
  never = early_code == EARLY_STOPPING_CODES["never"]
  best_len = jnp.where(never & (length_penalty > 0), limit, t + 1).astype(jnp.float32)
  best_running_B1 = run_score[:, :1] / best_len ** length_penalty
  worst_done_BK = jnp.where(fin_done, jnp.min(fin_score, axis=1, keepdims=True), NEG)
  improvable = st.improvable_B1 & jnp.any(best_running_B1 > worst_done_BK, axis=-1,
                                          keepdims=True)
  keep_going = (jnp.any(improvable) & ~(jnp.all(fin_done) & early_true)
                & ~jnp.all(hits_BC))
  new = BeamState(run_seq, run_score, fin_seq, fin_score, fin_done, improvable)
  return new, parent_BK, tok_BK, keep_going


@functools.partial(jax.jit, static_argnames=("model", "num_new", "num_beams", "stop_ids"))
def beam_loop(model, variables, ids_BP, mask_BP, px, limit, pad_id, length_penalty, early_code,
              bias_V, *, num_new: int, num_beams: int, stop_ids: tuple[int, ...]):
  """(finished sequences (B, K, num_new) int32, scores (B, K) float32), best first.

  Traced: `limit` (max_new_tokens <= num_new), `pad_id`, `length_penalty`, `early_code`, and
  `bias_V` (V,) float32, added to the prefill logits before the first log-softmax (step 0 only;
  scores then sum the biased step-0 log-probs).
  """
  b, p = ids_BP.shape
  k = num_beams
  model, variables = unstack_layers(model, variables)  # per-layer weights and caches, if set
  logits_BV, cache, cache_mask_BS, last_pos_B1 = prefill(model, variables, ids_BP, mask_BP, px,
                                                         num_new)
  rep = lambda x: jnp.repeat(x, k, axis=0)
  row_axis = 0 if isinstance(cache.k_LBKSH, tuple) else 1  # per-layer (B, Kh, S, H) or stacked
  cache = jax.tree.map(lambda c: jnp.repeat(c, k, axis=row_axis), cache)
  cache_mask_BS, last_pos_B1 = rep(cache_mask_BS), rep(last_pos_B1)
  stops_E = jnp.asarray(stop_ids, jnp.int32).reshape(-1)
  beam_base_BK = jnp.arange(b, dtype=jnp.int32)[:, None] * k

  def select(logits_BV, st, t, cache):
    logp_BKV = jax.nn.log_softmax(logits_BV.astype(jnp.float32), axis=-1).reshape(b, k, -1)
    st, parent_BK, tok_BK, keep_going = beam_step(logp_BKV, st, t, limit, stops_E,
                                                  length_penalty, early_code)
    rows = (beam_base_BK + parent_BK).reshape(-1)
    cache = jax.tree.map(lambda c: jnp.take(c, rows, axis=row_axis), cache)
    return st, tok_BK.reshape(-1), cache, keep_going

  st0 = init_state(b, k, num_new, pad_id)
  logits_BV = logits_BV + bias_V.astype(logits_BV.dtype)
  st, tok, cache, keep_going = select(rep(logits_BV), st0, jnp.int32(0), cache)

  def cond(carry):
    return carry[-1]

  def body(carry):
    t, st, tok, cache, _ = carry
    logits_BV, cache = decode_step(model, variables, tok, cache, cache_mask_BS, last_pos_B1, p,
                                   t - 1)
    st, tok, cache, keep_going = select(logits_BV, st, t, cache)
    return t + 1, st, tok, cache, keep_going

  _, st, _, _, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), st, tok, cache, keep_going))
  return st.fin_seq_BKN, st.fin_score_BK
