"""Batched greedy generation with a KV cache, compiled once per (batch, prompt, new-token) shape.

Prompts are left-padded (right-padded rows are moved to the left first); the prompt is prefilled
in one call, then one token per step is decoded inside a `lax.while_loop` that stops early once
every row has produced an end token. Positions follow `cumsum(attention_mask) - 1`, as HF
`generate` does.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mllm_tune.models.llava import Llava, check_image_token_count
from mllm_tune.models.llm import init_kv_cache


def left_pad(input_ids: np.ndarray, attention_mask: np.ndarray):
  """Move each row's real tokens to the right end (left padding); a no-op for left-padded rows."""
  ids, mask = np.array(input_ids), np.array(attention_mask)
  for b in range(ids.shape[0]):
    n = int(mask[b].sum())
    if n and not mask[b, -n:].all():
      keep = mask[b].astype(bool)
      ids[b] = np.concatenate([ids[b][~keep], ids[b][keep]])
      mask[b] = np.concatenate([np.zeros(ids.shape[1] - n, mask.dtype), np.ones(n, mask.dtype)])
  return ids, mask


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "eos_ids"))
def _generate(model, variables, ids_BP, mask_BP, px, max_new_tokens: int,
              eos_ids: tuple[int, ...], pad_id):
  b, p = ids_BP.shape
  llm_cfg = model.config.llm
  cache = init_kv_cache(llm_cfg, b, p + max_new_tokens, jnp.dtype(llm_cfg.dtype))
  cache_mask = jnp.concatenate([mask_BP, jnp.ones((b, max_new_tokens), mask_BP.dtype)], axis=1)
  pos_BP = jnp.maximum(jnp.cumsum(mask_BP, axis=-1) - 1, 0)
  kwargs = {"pixel_values": px} if px is not None else {}
  logits, cache = model.apply(variables, ids_BP, cache_mask, pos_BP, kv_cache=cache,
                              cache_index=0, **kwargs)
  eos = jnp.asarray(eos_ids if eos_ids else (-1,), jnp.int32)
  tok = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
  out = jnp.full((b, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(tok)
  done = jnp.isin(tok, eos)

  def cond(state):
    t, _, _, done, _ = state
    return (t < max_new_tokens) & ~jnp.all(done)

  def body(state):
    t, tok, cache, done, out = state
    pos = pos_BP[:, -1:] + t
    logits, cache = model.apply(variables, tok[:, None], cache_mask, pos, kv_cache=cache,
                                cache_index=p + t - 1)
    nxt = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
    nxt = jnp.where(done, pad_id, nxt)
    out = out.at[:, t].set(nxt)
    return t + 1, nxt, cache, done | jnp.isin(nxt, eos), out

  state = (jnp.int32(1), tok, cache, done, out)
  return jax.lax.while_loop(cond, body, state)[-1]


def generate(model, params, input_ids, attention_mask=None, pixel_values=None,
             max_new_tokens: int = 20, eos_token_id: int | Sequence[int] | None = None,
             pad_token_id: int = 0, adapters=None) -> jax.Array:
  """Greedy decoding. Returns the new tokens (B, max_new_tokens); after a row emits an
  `eos_token_id` the rest of it is `pad_token_id`. `pixel_values` NHWC for LLaVA models."""
  ids = np.asarray(input_ids)
  mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask)
  if mask.shape != ids.shape:
    raise ValueError(f"attention_mask shape {mask.shape} != input_ids shape {ids.shape}")
  if (mask.sum(-1) == 0).any():
    raise ValueError("a prompt row has no real tokens (attention_mask all zero)")
  ids, mask = left_pad(ids, mask)
  if isinstance(model, Llava):
    c = model.config
    check_image_token_count(ids, pixel_values, c.image_token_id, c.image_seq_len)
  elif pixel_values is not None:
    raise ValueError("pixel_values given to a text-only model")
  eos = () if eos_token_id is None else tuple(np.atleast_1d(eos_token_id).astype(int).tolist())
  variables = {"params": params} if adapters is None else {"params": params, "adapters": adapters}
  px = None if pixel_values is None else jnp.asarray(pixel_values)
  return _generate(model, variables, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32),
                   px, int(max_new_tokens), eos, jnp.int32(pad_token_id))
