"""Shared pieces of every decoding strategy: prompt checks, left padding, shape buckets, and the
KV-cache prefill / one-token step.

Layout: a prompt batch is left-padded to a bucketed length P (its real tokens end at slot P-1);
the cache holds S = P + N slots, N the bucketed number of new tokens. New token t (0-based) is
fed at slot P + t with position `last_prompt_position + t + 1` (positions count real tokens
only, `cumsum(attention_mask) - 1`, as HF `generate`). Cache slots of future tokens are marked
valid up front: the causal mask keeps them invisible until written.

M-RoPE models (Qwen2-VL / 2.5-VL / 3-VL) take explicit prompt positions (3, B, P) (`mt.hf_inputs`;
moved and padded with the tokens); new token t then sits at `max prompt position + t + 1` on all
three axes, which is transformers' `real tokens + t + rope_deltas` (`Qwen2VLModel.
compute_3d_position_ids` while decoding).
"""
from __future__ import annotations

from typing import Iterable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mllm_tune.models.llava import Llava, check_image_token_count
from mllm_tune.models.qwen_vl import PACK_TABLES, VISION_IDS, QwenVL
from mllm_tune.models.kv_cache import init_kv_cache

DEFAULT_BUCKET_FLOOR = 16
# the prompt inputs beside ids, mask and pixel_values (`mt.hf_inputs`): anyres pack tables;
# Qwen2-VL also its vision ids and (3, B, T) M-RoPE positions
IMAGE_TABLES = PACK_TABLES + VISION_IDS + ("positions",)


def left_pad(input_ids: np.ndarray, attention_mask: np.ndarray, *aligned: np.ndarray):
  """Move each row's real tokens to the right end (left padding); a no-op for left-padded rows.
  `aligned` arrays (B, T, ...) (e.g. anyres pack tables) are moved with the tokens and returned
  after (ids, mask)."""
  ids, mask = np.array(input_ids), np.array(attention_mask)
  aligned = [np.array(a) for a in aligned]
  for b in range(ids.shape[0]):
    n = int(mask[b].sum())
    if n and not mask[b, -n:].all():
      keep = mask[b].astype(bool)
      ids[b] = np.concatenate([ids[b][~keep], ids[b][keep]])
      for a in aligned:
        a[b] = np.concatenate([a[b][~keep], a[b][keep]])
      mask[b] = np.concatenate([np.zeros(ids.shape[1] - n, mask.dtype), np.ones(n, mask.dtype)])
  return (ids, mask, *aligned)


def next_bucket(n: int, floor: int | None = DEFAULT_BUCKET_FLOOR) -> int:
  """The compiled size for a length n: the next power of two >= max(n, floor); n if floor is None.

  A batch loop over prompts of lengths 3..200 with floor 16 compiles for 16, 32, 64, 128, 256
  only.
  """
  if floor is None:
    return int(n)
  if floor < 1:
    raise ValueError(f"bucket floor must be >= 1 (or None to disable buckets), got {floor}")
  return max(int(floor), 1 << (int(n) - 1).bit_length())


class Prompts(NamedTuple):
  """A validated, left-padded, bucketed prompt batch (host arrays) and the output size."""
  ids_BP: np.ndarray       # int32, left-padded to the bucketed length P
  mask_BP: np.ndarray      # int32, 1 on real tokens
  # anyres: a dict of pixel_values and pack tables; Qwen2-VL: also the vision ids and positions
  pixel_values: jax.Array | dict | None
  num_new: int             # N: bucketed capacity for new tokens (>= max_new_tokens)


def prepare_prompts(model, input_ids, attention_mask, pixel_values, max_new_tokens: int,
                    pad_token_id: int, bucket_floor: int | None,
                    image_tables: dict | None = None) -> Prompts:
  """Check a prompt batch against the model, left-pad it and pad it up to its length bucket.
  `image_tables`: the position-aligned pack tables of an anyres model (`mt.hf_inputs`); they
  are padded and moved with the tokens. Qwen2-VL models also take `positions` (3, B, T) (moved
  and padded the same way) and the batch-global `vision_segment_ids`, `vision_pos_hw`,
  `vision_window_ids`.

  Raises ValueError for shape mismatches, empty rows, image-token/image count mismatches, pixel
  values for a text-only model, and prompts (+ new tokens) longer than the model's
  `max_position_embeddings`.
  """
  if int(max_new_tokens) != max_new_tokens or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens}")
  ids = np.asarray(input_ids)
  if ids.ndim != 2:
    raise ValueError(f"input_ids must be (batch, length), got shape {ids.shape}")
  mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask)
  if mask.shape != ids.shape:
    raise ValueError(f"attention_mask shape {mask.shape} != input_ids shape {ids.shape}")
  lengths = mask.astype(bool).sum(-1)
  if (lengths == 0).any():
    raise ValueError("a prompt row has no real tokens (attention_mask all zero)")
  max_pos = model.config.llm.max_position_embeddings
  longest = int(lengths.max())
  if longest > max_pos:
    raise ValueError(f"a prompt has {longest} tokens, more than the model's "
                     f"max_position_embeddings = {max_pos}")
  if longest + max_new_tokens > max_pos:
    raise ValueError(f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                     f"model's max_position_embeddings = {max_pos}; lower max_new_tokens")
  tables = dict(image_tables or {})
  qwen = isinstance(model, QwenVL)
  unknown = set(tables) - set(PACK_TABLES) - (set(VISION_IDS) | {"positions"} if qwen else set())
  if unknown:
    raise TypeError(f"unexpected keyword argument(s) {sorted(unknown)}")
  anyres = isinstance(model, Llava) and model.config.anyres
  if tables and not (anyres or qwen):
    raise ValueError(f"{sorted(tables)} are for anyres models (LLaVA-NeXT / OneVision) and "
                     "Qwen2-VL only")
  if (anyres or qwen) and pixel_values is not None:
    need = set(PACK_TABLES) | ({"positions", "vision_segment_ids", "vision_pos_hw"} if qwen
                               else set())
    if qwen and model.config.vision.windowed:
      need.add("vision_window_ids")
    if need - set(tables):
      raise ValueError(f"{model.config.model_type}: pixel_values need {sorted(need)}; "
                       "mt.hf_inputs builds them from a processor's output")
  global_ids = {k: tables.pop(k) for k in VISION_IDS if k in tables}
  if "positions" in tables:  # (3, B, T) -> (B, T, 3) to move with the tokens
    if np.ndim(tables["positions"]) != 3 or np.shape(tables["positions"])[0] != 3:
      raise ValueError(f"positions of shape {np.shape(tables['positions'])}: expected the "
                       "(3, B, T) M-RoPE ids")
    tables["positions"] = np.moveaxis(np.asarray(tables["positions"]), 0, -1)
  for k, v in tables.items():
    if np.shape(v)[:2] != ids.shape:
      raise ValueError(f"{k} of shape {np.shape(v)} does not match input_ids {ids.shape}")
  names = sorted(tables)
  ids, mask, *moved = left_pad(ids, mask, *(tables[k] for k in names))
  tables = dict(zip(names, moved))
  if isinstance(model, (Llava, QwenVL)):
    c = model.config
    if not (anyres or qwen):
      check_image_token_count(ids, pixel_values, c.image_token_id, c.image_seq_len)
    fill = next(f for f in (pad_token_id, 0, 1, 2)
                if f not in c.vision_token_ids)  # never an image / video token
  elif pixel_values is not None:
    raise ValueError("pixel_values given to a text-only model")
  else:
    fill = pad_token_id
  extra = next_bucket(ids.shape[1], bucket_floor) - ids.shape[1]
  ids = np.pad(ids, ((0, 0), (extra, 0)), constant_values=fill).astype(np.int32)
  mask = np.pad(mask, ((0, 0), (extra, 0))).astype(np.int32)
  px = None if pixel_values is None else jnp.asarray(pixel_values)
  padded = {k: jnp.asarray(np.pad(v, ((0, 0), (extra, 0)) + ((0, 0),) * (v.ndim - 2)))
            for k, v in tables.items()}
  if "positions" in padded:
    padded["positions"] = jnp.moveaxis(padded["positions"], -1, 0).astype(jnp.int32)
  if px is not None and (anyres or qwen):
    px = {"pixel_values": px, **padded, **{k: jnp.asarray(v) for k, v in global_ids.items()}}
  elif "positions" in padded:  # text only, explicit positions
    px = {"positions": padded["positions"]}
  return Prompts(ids, mask, px, next_bucket(int(max_new_tokens), bucket_floor))


def stop_id_tuple(*groups: int | Iterable[int] | None) -> tuple[int, ...]:
  """Sorted unique token ids from ints, iterables (sets too) or None: a hashable jit argument."""
  ids: set[int] = set()
  for g in groups:
    if g is None:
      continue
    for i in np.asarray(sorted(g) if isinstance(g, (set, frozenset)) else g).reshape(-1).tolist():
      if int(i) != i or i < 0:
        raise ValueError(f"token ids must be integers >= 0, got {i!r}")
      ids.add(int(i))
  return tuple(sorted(ids))


def special_ids(model, eos_token_id=None, pad_token_id=None
                ) -> tuple[int | Iterable[int] | None, int]:
  """(eos ids, pad id) for a decoding call: the explicit arguments win; None takes the
  checkpoint's `generation_config.json` (carried as `model.config.generation_json` by
  `load_pretrained`), as HF `generate` does: its `eos_token_id` (int or list), its
  `pad_token_id`, else its first eos id (HF's rule), else 0."""
  import json
  text = getattr(model.config, "generation_json", "") or ""
  gen = json.loads(text) if text else {}
  if eos_token_id is None:
    eos_token_id = gen.get("eos_token_id")
  if pad_token_id is None:
    pad_token_id = gen.get("pad_token_id")
    if pad_token_id is None:
      eos = gen.get("eos_token_id")
      first = eos[0] if isinstance(eos, list) and eos else eos
      pad_token_id = 0 if first is None else first
  return eos_token_id, int(pad_token_id)


def first_token_bias_of(model, bias) -> jax.Array:
  """The (V,) float32 step-0 logit bias to trace into a decoding loop: zeros for None (so a bias
  never recompiles). Raises ValueError unless its shape is (vocab_size,) and it holds no NaN or
  +inf (-inf is allowed: it bans a token at step 0)."""
  v = model.config.llm.vocab_size
  if bias is None:
    return jnp.zeros((v,), jnp.float32)
  arr = np.asarray(bias, np.float32)
  if arr.shape != (v,):
    raise ValueError(f"first_token_logit_bias must have shape (vocab_size,) = ({v},), got "
                     f"{arr.shape}")
  if np.isnan(arr).any() or np.isposinf(arr).any():
    raise ValueError("first_token_logit_bias must not hold NaN or +inf")
  return jnp.asarray(arr)


def variables_of(params, adapters) -> dict:
  return {"params": params} if adapters is None else {"params": params, "adapters": adapters}


def prefill(model, variables, ids_BP, mask_BP, px, num_new: int):
  """Run the prompt through the model into a fresh cache of S = P + num_new slots.

  Returns (last-token logits (B, V) float32, cache, cache mask (B, S), last positions (B, 1)).
  `px` may carry explicit M-RoPE `positions` (3, B, P); the last position is then the largest
  over the real tokens and the three axes.
  """
  b, p = ids_BP.shape
  llm_cfg = model.config.llm
  cache = init_kv_cache(llm_cfg, b, p + num_new, jnp.dtype(llm_cfg.dtype))
  cache_mask_BS = jnp.concatenate([mask_BP, jnp.ones((b, num_new), mask_BP.dtype)], axis=1)
  kwargs = dict(px) if isinstance(px, dict) else {"pixel_values": px} if px is not None else {}
  pos = kwargs.pop("positions", None)
  if pos is None:
    pos = jnp.maximum(jnp.cumsum(mask_BP, axis=-1) - 1, 0)
    last_B1 = pos[:, -1:]
  else:
    real = mask_BP.astype(bool)[None]
    last_B1 = jnp.max(jnp.where(real, pos, 0), axis=(0, 2))[:, None]
  logits_B1V, cache = model.apply(variables, ids_BP, cache_mask_BS, pos, kv_cache=cache,
                                  cache_index=0, last_logits_only=True, **kwargs)
  return logits_B1V[:, -1], cache, cache_mask_BS, last_B1


def decode_step(model, variables, tok_B, cache, cache_mask_BS, last_pos_B1, prompt_len: int, t):
  """Feed new token t (B,) at slot P + t, position last + t + 1: (next logits (B, V), cache)."""
  logits_B1V, cache = model.apply(variables, tok_B[:, None], cache_mask_BS, last_pos_B1 + t + 1,
                                  kv_cache=cache, cache_index=prompt_len + t)
  return logits_B1V[:, -1], cache
