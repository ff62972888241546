"""Decoder LLM for the Llama / Qwen2 / Mistral family (Flax linen, layers scanned).

Param tree (storage, leading axis L on `layers`):
  embed/embedding (V, D); layers/{input_norm,post_attn_norm}/scale (L, D);
  layers/attn/{q,k,v,o}_proj/{kernel,bias} (L, D_in, D_out); layers/mlp/{gate,up,down}_proj/kernel;
  final_norm/scale (D,); lm_head/kernel (D, V) unless embeddings are tied.

Positions default to `cumsum(attention_mask) - 1`, so a sample's logits do not depend on how much
padding (left or right) surrounds it. A KV cache is a pair of arrays (L, B, S, K, H) that the caller
threads through `__call__` (see `init_kv_cache`); keys are stored after RoPE.
"""
from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from mllm_tune.models.config import LLMConfig, RopeConfig
from mllm_tune.models.layers import (ADAPTERS, Linear, RMSNorm, activation, attention, dtype_of)


class KVCache(NamedTuple):
  k_LBSKH: jax.Array
  v_LBSKH: jax.Array


def init_kv_cache(cfg: LLMConfig, batch: int, capacity: int, dtype=jnp.float32) -> KVCache:
  shape = (cfg.num_layers, batch, capacity, cfg.num_kv_heads, cfg.head_dim)
  return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> np.ndarray:
  """Inverse frequencies (H/2,) in float32, with HF's `linear` and `llama3` scaling."""
  inv = 1.0 / (rope.theta ** (np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32)
                              / head_dim))
  inv = inv.astype(np.float32)
  if rope.rope_type == "linear":
    inv = inv / np.float32(rope.factor)
  elif rope.rope_type == "llama3":
    old = rope.original_max_position_embeddings
    low_wavelen = old / rope.low_freq_factor
    high_wavelen = old / rope.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / rope.factor, inv)
    smooth = (old / wavelen - rope.low_freq_factor) / (rope.high_freq_factor
                                                       - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    inv = np.where(medium, smoothed, scaled).astype(np.float32)
  elif rope.rope_type != "default":
    raise ValueError(f"rope type '{rope.rope_type}' is not supported")
  return inv


def rope_sin_cos(positions_BT: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
  freqs_BTh = positions_BT.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None]
  emb_BTH = jnp.concatenate([freqs_BTh, freqs_BTh], axis=-1)
  return jnp.sin(emb_BTH), jnp.cos(emb_BTH)


def apply_rope(x_BTNH: jax.Array, sin_BTH: jax.Array, cos_BTH: jax.Array) -> jax.Array:
  """HF `rotate_half` RoPE (non-interleaved halves)."""
  half = x_BTNH.shape[-1] // 2
  rot = jnp.concatenate([-x_BTNH[..., half:], x_BTNH[..., :half]], axis=-1)
  sin = sin_BTH[:, :, None, :].astype(x_BTNH.dtype)
  cos = cos_BTH[:, :, None, :].astype(x_BTNH.dtype)
  return x_BTNH * cos + rot * sin


def causal_mask(query_slots_BT: jax.Array, key_valid_BS: jax.Array,
                sliding_window: int | None = None,
                segment_ids_BT: jax.Array | None = None) -> jax.Array:
  """Boolean (B, T, S): key slot j is visible to the query at slot i iff j <= i, key j is a real
  token, (optionally) i - j < window, and (optionally) both sit in the same packed segment."""
  key_slots = jnp.arange(key_valid_BS.shape[1])
  q = query_slots_BT[:, :, None]
  mask = (key_slots[None, None, :] <= q) & key_valid_BS[:, None, :].astype(bool)
  if sliding_window is not None:
    mask &= (q - key_slots[None, None, :]) < sliding_window
  if segment_ids_BT is not None:
    mask &= segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]
  return mask


class Attention(nn.Module):
  cfg: LLMConfig

  @nn.compact
  def __call__(self, x_BTD, sin_cos, mask_BTS, cache, cache_index):
    c = self.cfg
    lin = lambda f, bias, name: Linear(f, bias, c.dtype, c.param_dtype, name=name)
    b, t, _ = x_BTD.shape
    q = lin(c.num_heads * c.head_dim, c.qkv_bias, "q_proj")(x_BTD)
    k = lin(c.num_kv_heads * c.head_dim, c.qkv_bias, "k_proj")(x_BTD)
    v = lin(c.num_kv_heads * c.head_dim, c.qkv_bias, "v_proj")(x_BTD)
    q = apply_rope(q.reshape(b, t, c.num_heads, c.head_dim), *sin_cos)
    k = apply_rope(k.reshape(b, t, c.num_kv_heads, c.head_dim), *sin_cos)
    v = v.reshape(b, t, c.num_kv_heads, c.head_dim)
    if cache is not None:
      ck, cv = cache
      ck = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), (0, cache_index, 0, 0))
      cv = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), (0, cache_index, 0, 0))
      cache = (ck, cv)
      k, v = ck.astype(q.dtype), cv.astype(q.dtype)
    out = attention(q, k, v, mask_BTS).reshape(b, t, c.num_heads * c.head_dim)
    return lin(c.hidden_size, c.o_bias, "o_proj")(out), cache


class MLP(nn.Module):
  cfg: LLMConfig

  @nn.compact
  def __call__(self, x_BTD):
    c = self.cfg
    lin = lambda f, name: Linear(f, c.mlp_bias, c.dtype, c.param_dtype, name=name)
    act = activation(c.hidden_act)
    h = act(lin(c.intermediate_size, "gate_proj")(x_BTD)) * lin(c.intermediate_size,
                                                                "up_proj")(x_BTD)
    return lin(c.hidden_size, "down_proj")(h)


class DecoderBlock(nn.Module):
  """Pre-norm block; `__call__(carry, *broadcast, scanned)` in the nn.scan calling convention."""
  cfg: LLMConfig

  @nn.compact
  def __call__(self, h_BTD, sin_cos, mask_BTS, cache_index, layer_cache):
    c = self.cfg
    norm = lambda name: RMSNorm(c.rms_norm_eps, c.dtype, c.param_dtype, name=name)
    attn_out, layer_cache = Attention(c, name="attn")(norm("input_norm")(h_BTD), sin_cos,
                                                      mask_BTS, layer_cache, cache_index)
    h_BTD = h_BTD + attn_out
    h_BTD = h_BTD + MLP(c, name="mlp")(norm("post_attn_norm")(h_BTD))
    return h_BTD, layer_cache


REMAT_POLICIES = {
    "full": None,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
}


def scanned(block_cls, num_layers: int, remat_policy: str, n_broadcast: int):
  """Stack `block_cls` along a leading axis and run it with `nn.scan` (optionally rematted)."""
  if remat_policy != "none":
    if remat_policy not in REMAT_POLICIES:
      raise ValueError(f"remat_policy '{remat_policy}' unknown; choose from none, "
                       f"{', '.join(REMAT_POLICIES)}")
    block_cls = nn.remat(block_cls, policy=REMAT_POLICIES[remat_policy], prevent_cse=False)
  return nn.scan(block_cls, variable_axes={"params": 0, ADAPTERS: 0},
                 split_rngs={"params": True, "dropout": True},
                 in_axes=(nn.broadcast,) * n_broadcast + (0,), length=num_layers)


class LLM(nn.Module):
  """The decoder. Call with `input_ids` or `inputs_embeds` (after image merge)."""
  cfg: LLMConfig

  def setup(self):
    c = self.cfg
    self.embed = nn.Embed(c.vocab_size, c.hidden_size, dtype=dtype_of(c.dtype),
                          param_dtype=dtype_of(c.param_dtype),
                          embedding_init=nn.initializers.normal(0.02))
    self.layers = scanned(DecoderBlock, c.num_layers, c.remat_policy, 3)(c)
    self.final_norm = RMSNorm(c.rms_norm_eps, c.dtype, c.param_dtype)
    if not c.tie_word_embeddings:
      self.lm_head = Linear(c.vocab_size, False, c.dtype, c.param_dtype)

  def embed_tokens(self, ids_BT: jax.Array) -> jax.Array:
    return self.embed(ids_BT)

  def __call__(self, input_ids=None, attention_mask=None, positions=None, segment_ids=None,
               inputs_embeds=None, kv_cache: KVCache | None = None, cache_index=0):
    """Returns float32 logits (B, T, V), and the updated cache when `kv_cache` is given.

    Without a cache, `attention_mask` is (B, T). With a cache of capacity S, the T new tokens are
    written at slots [cache_index, cache_index + T) and `attention_mask` is (B, S): which cache
    slots hold real tokens; `positions` must then be given.
    """
    c = self.cfg
    h = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
    h = h.astype(dtype_of(c.dtype))
    b, t, _ = h.shape
    if attention_mask is None:
      attention_mask = jnp.ones((b, t if kv_cache is None else kv_cache.k_LBSKH.shape[2]),
                                jnp.int32)
    if positions is None:
      if kv_cache is not None:
        raise ValueError("positions must be given when decoding with a KV cache")
      positions = jnp.maximum(jnp.cumsum(attention_mask, axis=-1) - 1, 0)
    query_slots = cache_index + jnp.broadcast_to(jnp.arange(t), (b, t))
    mask = causal_mask(query_slots, attention_mask, c.sliding_window, segment_ids)
    sin_cos = rope_sin_cos(positions, rope_inv_freq(c.rope, c.head_dim))
    layer_caches = None if kv_cache is None else (kv_cache.k_LBSKH, kv_cache.v_LBSKH)
    h, layer_caches = self.layers(h, sin_cos, mask, cache_index, layer_caches)
    h = self.final_norm(h)
    if c.tie_word_embeddings:
      logits = self.embed.attend(h)
    else:
      logits = self.lm_head(h)
    logits = logits.astype(jnp.float32)
    if kv_cache is None:
      return logits
    return logits, KVCache(*layer_caches)


class CausalLM(nn.Module):
  """A bare LLM checkpoint (LlamaForCausalLM & co.); params live under `llm/` as in LLaVA."""
  config: object  # CausalLMConfig

  def setup(self):
    self.llm = LLM(self.config.llm)

  def __call__(self, input_ids, attention_mask=None, positions=None, segment_ids=None,
               pixel_values=None, kv_cache=None, cache_index=0):
    if pixel_values is not None:
      raise ValueError("this is a text-only model: pixel_values must be None")
    return self.llm(input_ids, attention_mask, positions, segment_ids, kv_cache=kv_cache,
                    cache_index=cache_index)


def with_dtypes(cfg: LLMConfig, dtype: str, param_dtype: str) -> LLMConfig:
  return dataclasses.replace(cfg, dtype=dtype, param_dtype=param_dtype)
