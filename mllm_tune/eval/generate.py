"""Batched generation with a KV cache: greedy, sampling (temperature / top-k / top-p) and beam
search, each compiled once per shape bucket and run inside `lax.while_loop` (no Python loop per
token).

Shapes are bucketed so an eval loop compiles only a handful of times: the prompt batch is
left-padded (right-padded rows are moved left first) up to `next_bucket(P)` columns and room for
`next_bucket(max_new_tokens)` new tokens is made; the loop stops after `max_new_tokens` (a traced
value) or once every row has produced an end token, and the result is cropped to
`max_new_tokens` columns. `bucket_floor=None` compiles for the exact shapes instead. Padding does
not change results: positions count real tokens (`cumsum(attention_mask) - 1`, as HF `generate`).

End tokens: `eos_token_id` and `stop_token_ids` are one set; a row stops after emitting any of
them (the token is kept in the output, the rest of the row is `pad_token_id`). `eos_token_id` /
`pad_token_id` left at None take the checkpoint's `generation_config.json`, as HF `generate`
does (`decoding.special_ids`); explicit arguments win. Stop *strings* are
applied host-side after generation, on decoded text (`generate_text`, `truncate_at_stop_strings`):
they do not stop the compiled loop early, they only cut the returned text.

Post-hoc hooks (traced, so they never recompile): `first_token_logit_bias` shifts the step-0
logits (open-ended logit calibration, docs/methods.md §6.4 (b)); `return_entropy` also returns each
step's
predictive entropy (DaWin's H(x), docs/methods.md §6.2). Both are used by
`posthoc/dawin_decoding.py`.
"""
from __future__ import annotations

import functools
from typing import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mllm_tune.eval import beam as beam_lib
from mllm_tune.eval.decoding import (DEFAULT_BUCKET_FLOOR, decode_step, first_token_bias_of,
                                     left_pad, next_bucket, prefill, prepare_prompts,
                                     special_ids, stop_id_tuple, variables_of)
from mllm_tune.eval.sampling import check_sampling_args, sample_tokens
from mllm_tune.models.kv_cache import unstack_layers
from mllm_tune.eval.sampling import entropy_from_logits

__all__ = ["generate", "generate_text", "beam_search", "left_pad", "next_bucket",
           "truncate_at_stop_strings", "decode_generated"]


@functools.partial(jax.jit, static_argnames=("model", "num_new"))
def _sample_loop(model, variables, ids_BP, mask_BP, px, limit, pad_id, stops_E, do_sample, rng,
                 temperature, top_k, top_p, bias_V, *, num_new: int):
  """(new tokens (B, num_new) int32, entropies (B, num_new) float32): greedy (`do_sample`
  False) or sampled; stops at `limit` tokens or when every row has emitted one of `stops_E` (-1
  entries are padding). `bias_V` (V,) is added to the step-0 logits only. Entropy t is
  `entropy_from_logits` of the logits that chose token t (bias included, before temperature and
  filters); 0 once the row has stopped. Everything but the model and the shapes is traced:
  greedy, sampling, any bias and any stop set of <= 8 ids share a compile."""
  b, p = ids_BP.shape
  model, variables = unstack_layers(model, variables)  # per-layer weights and caches, if set
  logits_BV, cache, cache_mask_BS, last_pos_B1 = prefill(model, variables, ids_BP, mask_BP, px,
                                                         num_new)
  logits_BV = logits_BV + bias_V.astype(logits_BV.dtype)

  def pick(logits_BV, t):
    return jax.lax.cond(
        do_sample,
        lambda: sample_tokens(jax.random.fold_in(rng, t), logits_BV, temperature, top_k, top_p),
        lambda: jnp.argmax(logits_BV, axis=-1).astype(jnp.int32))

  tok_B = pick(logits_BV, 0)
  out_BN = jnp.full((b, num_new), pad_id, jnp.int32).at[:, 0].set(tok_B)
  ent_BN = jnp.zeros((b, num_new), jnp.float32).at[:, 0].set(entropy_from_logits(logits_BV))
  done_B = jnp.isin(tok_B, stops_E)

  def cond(state):
    t, _, _, done_B, _, _ = state
    return (t < limit) & ~jnp.all(done_B)

  def body(state):
    t, tok_B, cache, done_B, out_BN, ent_BN = state
    logits_BV, cache = decode_step(model, variables, tok_B, cache, cache_mask_BS, last_pos_B1,
                                   p, t - 1)
    nxt_B = jnp.where(done_B, pad_id, pick(logits_BV, t))
    h_B = jnp.where(done_B, 0.0, entropy_from_logits(logits_BV))
    out_BN = jax.lax.dynamic_update_slice(out_BN, nxt_B[:, None], (0, t))
    ent_BN = jax.lax.dynamic_update_slice(ent_BN, h_B[:, None], (0, t))
    return t + 1, nxt_B, cache, done_B | jnp.isin(nxt_B, stops_E), out_BN, ent_BN

  state = (jnp.int32(1), tok_B, cache, done_B, out_BN, ent_BN)
  return jax.lax.while_loop(cond, body, state)[-2:]


def _stop_array(stop_ids: tuple[int, ...]) -> jax.Array:
  """Stop ids padded with -1 to a multiple of 8 entries (fewer distinct shapes to compile)."""
  size = max(8, -(-len(stop_ids) // 8) * 8)
  return jnp.asarray(list(stop_ids) + [-1] * (size - len(stop_ids)), jnp.int32)


def _check_beam_args(num_beams, length_penalty, early_stopping):
  if int(num_beams) != num_beams or num_beams < 1:
    raise ValueError(f"num_beams must be an integer >= 1, got {num_beams}")
  if not np.isfinite(length_penalty):
    raise ValueError(f"length_penalty must be finite, got {length_penalty}")
  beam_lib.early_stopping_code(early_stopping)  # validates


def beam_search(model, params, input_ids, attention_mask=None, pixel_values=None,
                max_new_tokens: int = 20, eos_token_id: int | Sequence[int] | None = None,
                pad_token_id: int | None = None, adapters=None, *, num_beams: int = 4,
                length_penalty: float = 1.0, early_stopping: bool | str = True,
                stop_token_ids: Iterable[int] | None = None,
                bucket_floor: int | None = DEFAULT_BUCKET_FLOOR,
                first_token_logit_bias: jax.Array | None = None, **image_tables):
  """Beam search with HF `generate(num_beams=K, do_sample=False)` semantics (see `eval/beam.py`).

  Returns (sequences (B, K, max_new_tokens) int32, scores (B, K) float32): the K best finished
  hypotheses per row, best first, new tokens only (pad after each end token), and their scores
  `sum(log p) / len ** length_penalty` (len counts new tokens, end token included).
  `early_stopping`: True stops a row once K hypotheses are finished; False and "never" are HF's
  heuristics (False: stop when the best running beam, at its current length, cannot beat the
  worst finished one; "never": the same at max length when `length_penalty > 0`).
  `first_token_logit_bias` (V,): added to the step-0 logits before the log-softmax (see
  `generate`); the scores include the biased step-0 log-probs.
  """
  _check_beam_args(num_beams, length_penalty, early_stopping)
  eos_token_id, pad_token_id = special_ids(model, eos_token_id, pad_token_id)
  bias_V = first_token_bias_of(model, first_token_logit_bias)
  pr = prepare_prompts(model, input_ids, attention_mask, pixel_values, max_new_tokens,
                       pad_token_id, bucket_floor, image_tables)
  seqs, scores = beam_lib.beam_loop(
      model, variables_of(params, adapters), jnp.asarray(pr.ids_BP), jnp.asarray(pr.mask_BP),
      pr.pixel_values, jnp.int32(max_new_tokens), jnp.int32(pad_token_id),
      jnp.float32(length_penalty), jnp.int32(beam_lib.early_stopping_code(early_stopping)),
      bias_V, num_new=pr.num_new, num_beams=int(num_beams),
      stop_ids=stop_id_tuple(eos_token_id, stop_token_ids))
  return seqs[:, :, :max_new_tokens], scores


def generate(model, params, input_ids, attention_mask=None, pixel_values=None,
             max_new_tokens: int = 20, eos_token_id: int | Sequence[int] | None = None,
             pad_token_id: int | None = None, adapters=None, *, do_sample: bool = False,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             rng: jax.Array | None = None, num_beams: int = 1, length_penalty: float = 1.0,
             early_stopping: bool | str = True, stop_token_ids: Iterable[int] | None = None,
             bucket_floor: int | None = DEFAULT_BUCKET_FLOOR,
             first_token_logit_bias: jax.Array | None = None,
             return_entropy: bool = False,
             **image_tables) -> jax.Array | tuple[jax.Array, jax.Array]:
  """New tokens (B, max_new_tokens) int32 for a prompt batch (B, L); `pixel_values` NHWC (LLaVA).
  Anyres models (LLaVA-NeXT / OneVision) take their crops as `pixel_values` and the pack tables
  as `image_tables` keywords (`pack_index`, `pack_weight`, `pack_newline`): pass
  `**mt.hf_inputs(model, processor_output)`. Rows may hold several images of different sizes.
  Qwen2-VL / 2.5-VL take their patch rows, vision ids, pack tables and (3, B, T) M-RoPE
  `positions` the same way (`mt.hf_inputs`).

  Greedy by default. `do_sample=True` draws each token from `softmax(logits / temperature)`
  restricted to the top-k (`top_k=0`: off) and the nucleus (`top_p=1`: off), `temperature=0`
  being greedy, with key `jax.random.fold_in(rng, t)` at step t: a fixed `rng` reproduces the
  output. `num_beams > 1` runs `beam_search` (`length_penalty`, `early_stopping` as there; note
  the default early_stopping=True, where HF's default is False) and returns its best hypothesis;
  `num_beams=1` is greedy, as in HF. After a row emits an end token (`eos_token_id` or any of
  `stop_token_ids`) the rest of it is `pad_token_id`. `eos_token_id` / `pad_token_id` default
  to the checkpoint's generation_config.json (its eos; its pad, else its first eos, else 0);
  explicit values win. `bucket_floor`: see the module docstring.

  `first_token_logit_bias` (V,) float32: added to the logits of decoding step 0 only (greedy,
  sampling and beam search), e.g. `calibration.first_token_bias` (docs/methods.md §6.4 (b)); traced,
  so it never recompiles (None runs with zeros). `return_entropy=True` (greedy / sampling only)
  returns `(tokens, entropy)`, entropy (B, max_new_tokens) float32: `dawin.entropy_from_logits`
  of the logits that chose each token (step-0 bias included, before temperature / top-k / top-p),
  0 after the row's end token (DaWin's H(x), docs/methods.md §6.2; see `posthoc/dawin_decoding.py`).

  Raises ValueError on bad knobs (num_beams < 1, top_p outside (0, 1], top_k < 0,
  temperature < 0, sampling knobs without do_sample, do_sample without rng, return_entropy with
  beams, a bias not shaped (V,) or holding NaN / +inf) and bad prompts (see
  `decoding.prepare_prompts`).
  """
  _check_beam_args(num_beams, length_penalty, early_stopping)
  eos_token_id, pad_token_id = special_ids(model, eos_token_id, pad_token_id)
  if return_entropy and num_beams > 1:
    raise ValueError("return_entropy=True is for greedy / sampling only, not beam search "
                     f"(num_beams={num_beams})")
  bias_V = first_token_bias_of(model, first_token_logit_bias)
  check_sampling_args(temperature, top_k, top_p)
  if do_sample:
    if num_beams > 1:
      raise ValueError("beam sampling (do_sample=True with num_beams > 1) is not supported")
    if rng is None:
      raise ValueError("do_sample=True needs a key: rng=jax.random.key(seed)")
  elif (temperature not in (0.0, 1.0)) or top_k or top_p != 1.0:
    raise ValueError("temperature/top_k/top_p have no effect without do_sample=True")
  if num_beams > 1:
    seqs, _ = beam_search(model, params, input_ids, attention_mask, pixel_values,
                          max_new_tokens, eos_token_id, pad_token_id, adapters,
                          num_beams=num_beams, length_penalty=length_penalty,
                          early_stopping=early_stopping, stop_token_ids=stop_token_ids,
                          bucket_floor=bucket_floor, first_token_logit_bias=bias_V,
                          **image_tables)
    return seqs[:, 0]
  pr = prepare_prompts(model, input_ids, attention_mask, pixel_values, max_new_tokens,
                       pad_token_id, bucket_floor, image_tables)
  key = jax.random.key(0) if rng is None else rng
  stops_E = _stop_array(stop_id_tuple(eos_token_id, stop_token_ids))
  out, ent = _sample_loop(model, variables_of(params, adapters), jnp.asarray(pr.ids_BP),
                          jnp.asarray(pr.mask_BP), pr.pixel_values, jnp.int32(max_new_tokens),
                          jnp.int32(pad_token_id), stops_E, jnp.bool_(do_sample), key,
                          jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p),
                          bias_V, num_new=pr.num_new)
  if return_entropy:
    return out[:, :max_new_tokens], ent[:, :max_new_tokens]
  return out[:, :max_new_tokens]


def truncate_at_stop_strings(text: str, stop_strings: Sequence[str]) -> str:
  """`text` up to (excluding) the earliest occurrence of any stop string; unchanged if none."""
  if isinstance(stop_strings, str):
    raise TypeError("stop_strings must be a sequence of strings, not one string")
  cut = len(text)
  for s in stop_strings:
    if not s:
      raise ValueError("stop strings must be non-empty")
    i = text.find(s)
    if i != -1:
      cut = min(cut, i)
  return text[:cut]


def decode_generated(new_BT, decode: Callable[[list[int]], str],
                     stop_strings: Sequence[str] = (),
                     stop_token_ids: Iterable[int] | None = None) -> list[str]:
  """Host-side: per row, drop everything from the first stop token on (the stop token too), call
  `decode(list_of_ids)`, then cut the text at the first stop string."""
  stops = set(stop_id_tuple(stop_token_ids))
  texts = []
  for row in np.asarray(new_BT).tolist():
    end = next((i for i, tok in enumerate(row) if tok in stops), len(row))
    texts.append(truncate_at_stop_strings(decode(row[:end]), stop_strings))
  return texts


def generate_text(model, params, input_ids, attention_mask=None, pixel_values=None, *,
                  decode: Callable[[list[int]], str], stop_strings: Sequence[str] = (),
                  eos_token_id: int | Sequence[int] | None = None,
                  stop_token_ids: Iterable[int] | None = None,
                  first_token_logit_bias: jax.Array | None = None,
                  **generate_kwargs) -> list[str]:
  """`generate` then `decode_generated`: one string per row, cut at end tokens and stop strings.

  Stop strings are checked on the decoded text after generation (the compiled loop runs until
  an end token or `max_new_tokens`), so pick `max_new_tokens` with that in mind.
  `first_token_logit_bias` goes to `generate`; `return_entropy` is refused (use `generate`).
  """
  if generate_kwargs.get("return_entropy"):
    raise ValueError("generate_text returns strings only; call generate(return_entropy=True)")
  generate_kwargs.pop("return_entropy", None)
  eos_token_id, generate_kwargs["pad_token_id"] = special_ids(
      model, eos_token_id, generate_kwargs.get("pad_token_id"))
  new_BT = generate(model, params, input_ids, attention_mask, pixel_values,
                    eos_token_id=eos_token_id, stop_token_ids=stop_token_ids,
                    first_token_logit_bias=first_token_logit_bias, **generate_kwargs)
  return decode_generated(new_BT, decode, stop_strings, stop_id_tuple(eos_token_id,
                                                                      stop_token_ids))
