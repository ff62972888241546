"""Decoder LLM for the Llama / Qwen2 / Mistral family and Qwen3-VL's Qwen3 text model (Flax
linen, layers scanned).

Param tree (storage, leading axis L on `layers`):
  embed/embedding (V, D); layers/{input_norm,post_attn_norm}/scale (L, D);
  layers/attn/{q,k,v,o}_proj/{kernel,bias} (L, D_in, D_out); layers/attn/{q,k}_norm/scale (L, H)
  (Qwen3); layers/mlp/{gate,up,down}_proj/kernel; final_norm/scale (D,); lm_head/kernel (D, V)
  unless embeddings are tied.

Positions default to `cumsum(attention_mask) - 1`, so a sample's logits do not depend on how much
padding (left or right) surrounds it. With `rope.mrope_section` (Qwen2-VL's M-RoPE) positions may
also be (3, B, T) (t, h, w) ids (`rope.rope_sin_cos`). The caller threads a KV cache
(`kv_cache.KVCache`, arrays (L, B, K, S, H)) through `__call__`; keys are stored after RoPE.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import linen as nn

from mllm_tune.models.attention import attention
from mllm_tune.models.config import LLMConfig
from mllm_tune.models.fused_ops import GATED_ACTS, gated_act
from mllm_tune.models.kv_cache import KVCache, init_kv_cache, kv_cache_slots
from mllm_tune.models.adapters import (ADAPTERS, ADAPTION_GATE, ADAPTION_GATE_TANH,
                                       ADAPTION_PROMPT, PREFIX_EMBEDDING, PREFIX_K,
                                       PREFIX_MLP_LEAVES, PREFIX_V, PROMPT_EMBEDDINGS,
                                       parallel_adapter)
from mllm_tune.models.embed import TokenEmbed
from mllm_tune.models.layers import Linear, RMSNorm, activation, dtype_of
from mllm_tune.models.moe import MoEMLP
from mllm_tune.models.prefix import prepend_prefix, prefix_mlp, split_prefix
from mllm_tune.models.rope import apply_rope, rope_inv_freq, rope_sin_cos
from mllm_tune.models.stacking import rematted, scanned


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


def token_valid(mask_BTS: jax.Array, cache_index) -> jax.Array:
  """Which of the T query tokens are real, (B, T) bool, read off the attention mask: a token
  sees its own key slot (cache_index + t) iff it is real (`causal_mask`)."""
  b, t, _ = mask_BTS.shape
  slots = jnp.broadcast_to(cache_index + jnp.arange(t)[None, :, None], (b, t, 1))
  return jnp.take_along_axis(mask_BTS, slots, axis=2)[..., 0]


class Attention(nn.Module):
  """GQA self-attention with RoPE. Hooks: `prefix_kv` (per-layer virtual key/values from the LLM's
  prompt/prefix hooks), and the LLaMA-Adapter leaves `adaption_prompt (P, D)` with a gate
  `adaption_gate ()` (raw, peft) or `adaption_gate_tanh ()` (tanh(g), official code): before
  `o_proj`, `out += g * softmax(q K_p^T / sqrt(H)) V_p`, `K_p = P K_k`, `V_p = P K_v` (frozen
  projections, no RoPE, no mask; docs/methods.md §3.6)."""
  cfg: LLMConfig

  @nn.compact
  def __call__(self, x_BTD, sin_cos, mask_BTS, cache, cache_index, prefix_kv=None):
    c = self.cfg
    lin = lambda f, bias, name: Linear(f, bias, c.dtype, c.param_dtype, name=name)
    b, t, _ = x_BTD.shape
    k_proj = lin(c.num_kv_heads * c.head_dim, c.qkv_bias, "k_proj")
    v_proj = lin(c.num_kv_heads * c.head_dim, c.qkv_bias, "v_proj")
    # one (B*T, D) view shared by the three projections, so a training step keeps one copy of
    # their input for the weight gradients instead of one per projection
    x_ND = x_BTD.reshape(b * t, -1)
    q = lin(c.num_heads * c.head_dim, c.qkv_bias, "q_proj")(x_ND)
    k, v = k_proj(x_ND), v_proj(x_ND)
    q = q.reshape(b, t, c.num_heads, c.head_dim)
    k = k.reshape(b, t, c.num_kv_heads, c.head_dim)
    if c.qk_norm:  # Qwen3: RMSNorm over each head before RoPE
      q = RMSNorm(c.rms_norm_eps, c.dtype, c.param_dtype, name="q_norm")(q)
      k = RMSNorm(c.rms_norm_eps, c.dtype, c.param_dtype, name="k_norm")(k)
    q, k = apply_rope(q, *sin_cos), apply_rope(k, *sin_cos)
    v = v.reshape(b, t, c.num_kv_heads, c.head_dim)
    if cache is not None:
      ck, cv = cache  # (B, K, S, H)
      ck = jax.lax.dynamic_update_slice(ck, k.swapaxes(1, 2).astype(ck.dtype),
                                        (0, 0, cache_index, 0))
      cv = jax.lax.dynamic_update_slice(cv, v.swapaxes(1, 2).astype(cv.dtype),
                                        (0, 0, cache_index, 0))
      cache = (ck, cv)
      k, v = ck.swapaxes(1, 2).astype(q.dtype), cv.swapaxes(1, 2).astype(q.dtype)
    if prefix_kv is not None:
      k, v, mask_BTS = prepend_prefix(k, v, mask_BTS, *prefix_kv)
    # a call with a KV cache is decoding (never differentiated): cuDNN takes any length there;
    # without a cache or virtual tokens the mask is within the causal triangle (causal_mask)
    out = attention(q, k, v, mask_BTS, c.attention_impl, site="llm", training=cache is None,
                    causal=cache is None and prefix_kv is None)
    gate = self._adaption_gate()
    if gate is not None:
      prompt_PD = self.get_variable(ADAPTERS, ADAPTION_PROMPT).astype(q.dtype)
      p = prompt_PD.shape[0]
      kv_shape = (b, p, c.num_kv_heads, c.head_dim)
      k_p = jnp.broadcast_to(k_proj(prompt_PD).reshape(kv_shape[1:]), kv_shape)
      v_p = jnp.broadcast_to(v_proj(prompt_PD).reshape(kv_shape[1:]), kv_shape)
      out = out + gate.astype(q.dtype) * attention(q, k_p, v_p, None, c.attention_impl,
                                                   site="llm_adapter", training=cache is None)
    out = out.reshape(b, t, c.num_heads * c.head_dim)
    return lin(c.hidden_size, c.o_bias, "o_proj")(out), cache

  def _adaption_gate(self):
    if not self.has_variable(ADAPTERS, ADAPTION_PROMPT):
      return None
    if self.has_variable(ADAPTERS, ADAPTION_GATE_TANH):
      return jnp.tanh(self.get_variable(ADAPTERS, ADAPTION_GATE_TANH))
    if not self.has_variable(ADAPTERS, ADAPTION_GATE):
      raise ValueError("adapter leaf 'adaption_prompt' needs a gate leaf beside it "
                       "('adaption_gate' or 'adaption_gate_tanh')")
    return self.get_variable(ADAPTERS, ADAPTION_GATE)


class MLP(nn.Module):
  cfg: LLMConfig

  @nn.compact
  def __call__(self, x_BTD):
    c = self.cfg
    lin = lambda f, name: Linear(f, c.mlp_bias, c.dtype, c.param_dtype, name=name)
    x_ND = x_BTD.reshape(-1, x_BTD.shape[-1])  # one input copy kept for gate and up
    gate = lin(c.intermediate_size, "gate_proj")(x_ND)
    up = lin(c.intermediate_size, "up_proj")(x_ND)
    if c.hidden_act in GATED_ACTS:  # custom VJP: keeps only gate and up for the backward
      h = gated_act(gate, up, c.hidden_act)
    else:
      h = activation(c.hidden_act)(gate) * up
    y_BTD = lin(c.hidden_size, "down_proj")(h).reshape(x_BTD.shape)
    return parallel_adapter(self, x_BTD, y_BTD)


class DecoderBlock(nn.Module):
  """Pre-norm block; `__call__(carry, *broadcast, scanned, deepstack)` in the nn.scan calling
  convention. The scanned input is `(layer_cache, layer_prefix[, layer_index])`: this layer's KV
  cache and virtual key/values (each None or a (k, v) pair) and its index. `deepstack` (broadcast,
  Qwen3-VL) is None or (n, B, T, D) inputs added to the output of layers 0..n-1 (zero away from
  the image tokens); it needs `layer_index`."""
  cfg: LLMConfig

  @nn.compact
  def __call__(self, h_BTD, sin_cos, mask_BTS, cache_index, layer_xs, deepstack=None):
    c = self.cfg
    layer_cache, layer_prefix = layer_xs[:2]
    norm = lambda name: RMSNorm(c.rms_norm_eps, c.dtype, c.param_dtype, name=name)
    attn_out, layer_cache = Attention(c, name="attn")(norm("input_norm")(h_BTD), sin_cos,
                                                      mask_BTS, layer_cache, cache_index,
                                                      layer_prefix)
    h_BTD = h_BTD + attn_out
    x_BTD = norm("post_attn_norm")(h_BTD)
    if c.num_experts:  # with a capacity factor, padding tokens take no expert capacity
      valid_BT = token_valid(mask_BTS, cache_index) if c.moe_capacity_factor else None
      h_BTD = h_BTD + MoEMLP(c, name="mlp")(x_BTD, valid_BT)
    else:
      h_BTD = h_BTD + MLP(c, name="mlp")(x_BTD)
    if deepstack is not None:
      h_BTD = add_deepstack(h_BTD, deepstack, layer_xs[2])
    return h_BTD, layer_cache


def add_deepstack(h_BTD: jax.Array, deepstack_nBTD: jax.Array, layer_index) -> jax.Array:
  """`h + deepstack[layer_index]` for layer_index < n, else h (Qwen3-VL's `_deepstack_process`;
  the inputs are zero away from the image tokens, and x + 0 == x)."""
  n = deepstack_nBTD.shape[0]
  add = jax.lax.dynamic_index_in_dim(deepstack_nBTD, jnp.minimum(layer_index, n - 1),
                                     keepdims=False)
  return jnp.where(layer_index < n, h_BTD + add.astype(h_BTD.dtype), h_BTD)


class LLM(nn.Module):
  """The decoder. Call with `input_ids` or `inputs_embeds` (after image merge).

  LLM-level adapter hooks (leaves under `llm/`, all optional; docs/methods.md §3.3, 3.4):
    prefix_k, prefix_v (L, n, K*H)        per-layer virtual key/values (prefix tuning), or
    prefix_embedding (n, t) + prefix_mlp_{w1 (t, h), b1 (h,), w2 (h, 2Lt), b2 (2Lt,)}
                                          the same through the training reparameterization MLP;
    prompt_embeddings (n, D)              soft prompt tokens (prompt tuning).
  Virtual tokens come first and are always visible; real tokens' positions shift by their count.
  Soft prompts see only each other (causal, positions 0..n-1), so they are run through the stack
  once on their own and enter every layer as key/values: the same result as prepending them to the
  (image-merged) embeddings with n mask ones, but logits stay (B, T, V), KV caches need no extra
  slots, and every packed segment sees the prompt. Unlike true concatenation they are also exempt
  from a sliding window. The prompt pass reruns on every call (n tokens; during token-by-token
  decoding that is n extra rows per step, which XLA may hoist out of a decode loop).
  """
  cfg: LLMConfig

  def setup(self):
    c = self.cfg
    self.embed = TokenEmbed(c.vocab_size, c.hidden_size, dtype=dtype_of(c.dtype),
                            param_dtype=dtype_of(c.param_dtype),
                            embedding_init=nn.initializers.normal(0.02),
                            pad_id=c.pad_token_id)
    if c.scan_layers:
      self.layers = scanned(DecoderBlock, c.num_layers, c.remat_policy, 3, c.scan_unroll, 1)(c)
    else:  # layers_0 .. layers_{L-1} (`unstack_layers` converts the parameters)
      block = rematted(DecoderBlock, c.remat_policy)
      self.layers = [block(c) for _ in range(c.num_layers)]
    self.final_norm = RMSNorm(c.rms_norm_eps, c.dtype, c.param_dtype)
    if not c.tie_word_embeddings:
      self.lm_head = Linear(c.vocab_size, False, c.dtype, c.param_dtype)

  def embed_tokens(self, ids_BT: jax.Array) -> jax.Array:
    return self.embed(ids_BT)

  def _adapter(self, name: str):
    return self.get_variable(ADAPTERS, name) if self.has_variable(ADAPTERS, name) else None

  def learned_prefix(self):
    """Prefix-tuning key/values (L, 1, n, K, H) each, or None."""
    c = self.cfg
    k, v = self._adapter(PREFIX_K), self._adapter(PREFIX_V)
    if self._adapter(PREFIX_EMBEDDING) is not None:
      if k is not None:
        raise ValueError("adapters hold both prefix_k/v and a prefix reparameterization MLP")
      parts = [self._adapter(n) for n in PREFIX_MLP_LEAVES]
      if any(x is None for x in parts):
        raise ValueError(f"prefix reparameterization needs all of {PREFIX_MLP_LEAVES}")
      k, v = split_prefix(prefix_mlp(*parts), c.num_layers)
    if (k is None) != (v is None):
      raise ValueError("adapter leaves prefix_k and prefix_v must be given together")
    if k is None:
      return None
    want = (c.num_layers, k.shape[1], c.num_kv_heads * c.head_dim)
    if k.shape != want or v.shape != want:
      raise ValueError(f"prefix_k/prefix_v have shapes {k.shape}/{v.shape}; this LLM needs "
                       f"(L, n, K*H) = {want}")
    shape = (c.num_layers, 1, k.shape[1], c.num_kv_heads, c.head_dim)
    dt = dtype_of(c.dtype)
    return k.reshape(shape).astype(dt), v.reshape(shape).astype(dt)

  def prompt_kv(self, prompts_nD: jax.Array, prefix):
    """Run the soft prompt alone through the stack: its key/values (L, 1, n, K, H) per layer."""
    c = self.cfg
    dt = dtype_of(c.dtype)
    n = prompts_nD.shape[0]
    offset = 0 if prefix is None else prefix[0].shape[2]
    slots = jnp.arange(n)[None]
    mask = causal_mask(slots, jnp.ones((1, n), jnp.int32), c.sliding_window)
    sin_cos = rope_sin_cos(offset + slots, rope_inv_freq(c.rope, c.head_dim))
    cache = init_kv_cache(c, 1, n, dt)
    _, (k, v) = self.run_layers(prompts_nD[None].astype(dt), sin_cos, mask, 0,
                                (cache.k_LBKSH, cache.v_LBKSH), prefix)
    if not c.scan_layers:
      k, v = jnp.stack(k), jnp.stack(v)
    return k.swapaxes(2, 3), v.swapaxes(2, 3)  # (L, 1, n, K, H) as prefix key/values

  def run_layers(self, h_BTD, sin_cos, mask_BTS, cache_index, layer_caches, virtual,
                 deepstack=None):
    """The decoder stack: (h, updated caches or None); caches stacked or per layer (KVCache).
    `deepstack`: None or (n, B, T, D), added after layers 0..n-1 (`add_deepstack`)."""
    if self.cfg.scan_layers:
      return self.layers(h_BTD, sin_cos, mask_BTS, cache_index,
                         (layer_caches, virtual, jnp.arange(self.cfg.num_layers)), deepstack)
    ks, vs = [], []
    for i, block in enumerate(self.layers):
      cache_i = None if layer_caches is None else (layer_caches[0][i], layer_caches[1][i])
      virtual_i = None if virtual is None else (virtual[0][i], virtual[1][i])
      h_BTD, cache_i = block(h_BTD, sin_cos, mask_BTS, cache_index, (cache_i, virtual_i, i),
                             deepstack if deepstack is not None and i < len(deepstack) else None)
      if cache_i is not None:
        ks.append(cache_i[0])
        vs.append(cache_i[1])
    return h_BTD, (None if layer_caches is None else (tuple(ks), tuple(vs)))

  def virtual_kv(self):
    """All virtual key/values (L, 1, n, K, H): prefix tuning first, then soft prompts; or None."""
    prefix = self.learned_prefix()
    prompts = self._adapter(PROMPT_EMBEDDINGS)
    if prompts is None:
      return prefix
    k, v = self.prompt_kv(prompts, prefix)
    if prefix is None:
      return k, v
    return (jnp.concatenate([prefix[0], k], axis=2), jnp.concatenate([prefix[1], v], axis=2))

  def __call__(self, input_ids=None, attention_mask=None, positions=None, segment_ids=None,
               inputs_embeds=None, kv_cache: KVCache | None = None, cache_index=0,
               last_logits_only: bool = False, return_hidden: bool = False, deepstack=None):
    """Returns float32 logits (B, T, V), and the updated cache when `kv_cache` is given.
    `last_logits_only`: logits (B, 1, V) of the last position only (a decoding prefill needs no
    more, and the vocabulary projection of a long prompt is most of its FLOPs).
    `return_hidden`: the final-normed hidden states (B, T, D) instead of logits; `head` maps
    them to logits (the training loss applies it chunk by chunk, `losses.chunked`).

    `positions` are (B, T), or (3, B, T) M-RoPE ids (t, h, w) for a config with
    `rope.mrope_section` (Qwen2-VL; `models.qwen_vl_host.get_rope_index`). `deepstack`
    (Qwen3-VL): None or (n, B, T, D) visual features added after each of the first n layers.

    Without a cache, `attention_mask` is (B, T). With a cache of capacity S, the T new tokens are
    written at slots [cache_index, cache_index + T) and `attention_mask` is (B, S): which cache
    slots hold real tokens; `positions` must then be given. Positions count real tokens only;
    virtual tokens (prompt/prefix hooks) shift them internally.
    """
    c = self.cfg
    h = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
    h = h.astype(dtype_of(c.dtype))
    b, t, _ = h.shape
    if attention_mask is None:
      attention_mask = jnp.ones((b, t if kv_cache is None else kv_cache_slots(kv_cache)),
                                jnp.int32)
    if positions is None:
      if kv_cache is not None:
        raise ValueError("positions must be given when decoding with a KV cache")
      positions = jnp.maximum(jnp.cumsum(attention_mask, axis=-1) - 1, 0)
    virtual = self.virtual_kv()
    if virtual is not None:
      positions = positions + virtual[0].shape[2]
    query_slots = cache_index + jnp.broadcast_to(jnp.arange(t), (b, t))
    mask = causal_mask(query_slots, attention_mask, c.sliding_window, segment_ids)
    sin_cos = rope_sin_cos(positions, rope_inv_freq(c.rope, c.head_dim), c.rope.mrope_section,
                           c.rope.mrope_interleaved)
    layer_caches = None if kv_cache is None else (kv_cache.k_LBKSH, kv_cache.v_LBKSH)
    h, layer_caches = self.run_layers(h, sin_cos, mask, cache_index, layer_caches, virtual,
                                      deepstack)
    if last_logits_only:
      h = h[:, -1:]
    h = self.final_norm(h)
    out = h if return_hidden else self.head(h)
    if kv_cache is None:
      return out
    return out, KVCache(*layer_caches)

  def head(self, h_BTD: jax.Array) -> jax.Array:
    """Final-normed hidden states -> float32 vocabulary logits (tied or own LM head)."""
    if self.cfg.tie_word_embeddings:  # as rows (N, D): see `layers.Linear`
      logits = self.embed.attend(h_BTD.reshape(-1, h_BTD.shape[-1]))
      return logits.reshape(*h_BTD.shape[:-1], -1).astype(jnp.float32)
    return self.lm_head(h_BTD).astype(jnp.float32)


class CausalLM(nn.Module):
  """A bare LLM checkpoint (LlamaForCausalLM & co.); params live under `llm/` as in LLaVA."""
  config: object  # CausalLMConfig

  def setup(self):
    self.llm = LLM(self.config.llm)

  def __call__(self, input_ids, attention_mask=None, positions=None, segment_ids=None,
               pixel_values=None, kv_cache=None, cache_index=0, last_logits_only=False,
               return_hidden=False):
    if pixel_values is not None:
      raise ValueError("this is a text-only model: pixel_values must be None")
    return self.llm(input_ids, attention_mask, positions, segment_ids, kv_cache=kv_cache,
                    cache_index=cache_index, last_logits_only=last_logits_only,
                    return_hidden=return_hidden)


def with_dtypes(cfg: LLMConfig, dtype: str, param_dtype: str) -> LLMConfig:
  return dataclasses.replace(cfg, dtype=dtype, param_dtype=param_dtype)
