"""CLIP and SigLIP ViT vision towers (Flax linen, layers scanned).

Param tree (storage, leading axis L on `layers`):
  embed/patch_kernel (P, P, C, D) [+ embed/patch_bias (D,) SigLIP] [+ embed/class_embedding (D,)
  CLIP]; embed/position_embedding (num_positions, D); pre_norm (CLIP only);
  layers/{norm1,norm2}/{scale,bias}; layers/attn/{q,k,v,out}_proj; layers/mlp/fc{1,2};
  post_norm; head/... (SigLIP with `vision_use_head`).
`post_norm` and `head` are not used by LLaVA (it reads `hidden_states[feature_layer]`); they are
created at init and carried so checkpoints round-trip exactly.

`pixel_values` are NHWC (HF's are NCHW).

Visual prompt hooks (VPT, docs/methods.md §3.7; adapter leaves under `vision/`, all optional):
  prompt_tokens (p, D)            shallow: p tokens inserted after the class token (SigLIP: first),
                                  after CLIP's `pre_norm`, carried through every layer;
  deep_prompt_tokens (L, p, D)    deep: layer l's input prompt slots are replaced by row l;
  prompt_dropout ()               dropout rate on the prompt tokens (with a 'dropout' rng).
Prompt outputs are dropped before the tower returns, so feature shapes do not change.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from mllm_tune.models.config import VisionConfig
from mllm_tune.models.attention import attention
from mllm_tune.models import adapters
from mllm_tune.models.adapters import (DEEP_PROMPT_TOKENS, PROMPT_DROPOUT, PROMPT_TOKENS,
                                       parallel_adapter)
from mllm_tune.models.layers import Linear, LayerNorm, activation, dtype_of
from mllm_tune.models.stacking import scanned


class VisionEmbed(nn.Module):
  cfg: VisionConfig

  @nn.compact
  def __call__(self, px_NHWC: jax.Array) -> jax.Array:
    c = self.cfg
    pdt, dt = dtype_of(c.param_dtype), dtype_of(c.dtype)
    p, d = c.patch_size, c.hidden_size
    n, hh, ww, ch = px_NHWC.shape
    if hh != c.image_size or ww != c.image_size or ch != c.num_channels:
      raise ValueError(f"pixel_values have shape {px_NHWC.shape} (NHWC); this vision tower "
                       f"expects (N, {c.image_size}, {c.image_size}, {c.num_channels})")
    kernel = self.param("patch_kernel", nn.initializers.normal(0.02), (p, p, ch, d), pdt)
    gh, gw = hh // p, ww // p
    patches = px_NHWC.astype(dt)[:, :gh * p, :gw * p].reshape(n, gh, p, gw, p, ch)
    x = jnp.einsum("nypxqc,pqcd->nyxd", patches, kernel.astype(dt)).reshape(n, gh * gw, d)
    if not c.is_clip:
      x = x + self.param("patch_bias", nn.initializers.zeros, (d,), pdt).astype(dt)
    else:
      cls = self.param("class_embedding", nn.initializers.normal(d ** -0.5), (d,), pdt)
      x = jnp.concatenate([jnp.broadcast_to(cls.astype(dt), (n, 1, d)), x], axis=1)
    pos = self.param("position_embedding", nn.initializers.normal(0.02), (c.num_positions, d),
                     pdt)
    return x + pos.astype(dt)[None]


class VisionAttention(nn.Module):
  """CLIP/SigLIP self-attention (q/k/v/out projections with bias); `mask_NTT` (bool) for the
  CLIP text tower's causal + padding mask, None (full attention) for images."""
  cfg: VisionConfig

  @nn.compact
  def __call__(self, x_NTD, mask_NTT=None):
    c = self.cfg
    n, t, d = x_NTD.shape
    h = d // c.num_heads
    lin = lambda name: Linear(d, True, c.dtype, c.param_dtype, name=name)
    q, k, v = (lin(f"{s}_proj")(x_NTD).reshape(n, t, c.num_heads, h) for s in "qkv")
    site = getattr(c, "model_type", "clip_text_model")  # the CLIP text tower reuses this layer
    out = attention(q, k, v, mask_NTT, c.attention_impl, site=site)
    return lin("out_proj")(out.reshape(n, t, d))


class VisionMLP(nn.Module):
  cfg: VisionConfig

  @nn.compact
  def __call__(self, x):
    c = self.cfg
    y = Linear(c.intermediate_size, True, c.dtype, c.param_dtype, name="fc1")(x)
    y = Linear(c.hidden_size, True, c.dtype, c.param_dtype, name="fc2")(activation(c.hidden_act)(y))
    return parallel_adapter(self, x, y)


def num_prefix_tokens(cfg: VisionConfig) -> int:
  """Tokens before the patches (CLIP's class token); visual prompts are inserted after them."""
  return 1 if cfg.is_clip else 0


def insert_prompts(h_NTD: jax.Array, prompts_pD: jax.Array, start: int) -> jax.Array:
  """(N, T, D) -> (N, T + p, D) with the prompts at slots [start, start + p)."""
  fill = jnp.broadcast_to(prompts_pD.astype(h_NTD.dtype), (h_NTD.shape[0],) + prompts_pD.shape)
  return jnp.concatenate([h_NTD[:, :start], fill, h_NTD[:, start:]], axis=1)


def replace_prompts(h_NTD: jax.Array, prompts_pD: jax.Array, start: int) -> jax.Array:
  """Overwrite slots [start, start + p) of every sequence with the prompts."""
  n, _, d = h_NTD.shape
  p = prompts_pD.shape[0]
  fill = jnp.broadcast_to(prompts_pD.astype(h_NTD.dtype), (n, p, d))
  return jnp.concatenate([h_NTD[:, :start], fill, h_NTD[:, start + p:]], axis=1)


class VisionBlock(nn.Module):
  """Pre-norm ViT block; carries (h, selected) so one scan yields `hidden_states[k]`. The scanned
  input is `(layer_index, layer_prompts)`; deep VPT prompts (p, D) replace the prompt slots."""
  cfg: VisionConfig

  @nn.compact
  def __call__(self, carry, feature_index, layer_xs):
    c = self.cfg
    h, selected = carry
    layer_index, layer_prompts = layer_xs
    if layer_prompts is not None:
      h = replace_prompts(h, layer_prompts, num_prefix_tokens(c))
    norm = lambda name: LayerNorm(c.layer_norm_eps, c.dtype, c.param_dtype, name=name)
    h = h + VisionAttention(c, name="attn")(norm("norm1")(h))
    h = h + VisionMLP(c, name="mlp")(norm("norm2")(h))
    selected = jnp.where(layer_index + 1 == feature_index, h, selected)
    return (h, selected), None


class SiglipHead(nn.Module):
  """SigLIP multi-head attention pooling head (torch `nn.MultiheadAttention` parameter layout)."""
  cfg: VisionConfig

  @nn.compact
  def __call__(self, x_NTD):
    c = self.cfg
    n, t, d = x_NTD.shape
    pdt = dtype_of(c.param_dtype)
    probe = self.param("probe", nn.initializers.normal(1.0), (1, 1, d), pdt)
    in_kernel = self.param("in_proj_kernel", nn.initializers.normal(0.02), (d, 3 * d), pdt)
    in_bias = self.param("in_proj_bias", nn.initializers.zeros, (3 * d,), pdt)
    q = jnp.broadcast_to(probe, (n, 1, d)) @ in_kernel[:, :d] + in_bias[:d]
    k = x_NTD @ in_kernel[:, d:2 * d] + in_bias[d:2 * d]
    v = x_NTD @ in_kernel[:, 2 * d:] + in_bias[2 * d:]
    hd = d // c.num_heads
    split = lambda z: z.reshape(n, -1, c.num_heads, hd)
    out = attention(split(q), split(k), split(v), None, c.attention_impl,
                    site="vision head").reshape(n, 1, d)
    out = Linear(d, True, c.dtype, c.param_dtype, name="out_proj")(out)
    res = out
    out = LayerNorm(c.layer_norm_eps, c.dtype, c.param_dtype, name="layernorm")(out)
    return (res + VisionMLP(c, name="mlp")(out))[:, 0]


class VisionTower(nn.Module):
  """`__call__(px_NHWC, feature_layer)` returns HF's `hidden_states[feature_layer]` (N, T, D)."""
  cfg: VisionConfig

  @nn.compact
  def __call__(self, px_NHWC: jax.Array, feature_layer: int = -2) -> jax.Array:
    c = self.cfg
    k = feature_layer if feature_layer >= 0 else c.num_layers + 1 + feature_layer
    if not 0 <= k <= c.num_layers:
      raise ValueError(f"feature_layer={feature_layer} out of range for {c.num_layers} layers")
    norm = lambda name: LayerNorm(c.layer_norm_eps, c.dtype, c.param_dtype, name=name)
    h = VisionEmbed(c, name="embed")(px_NHWC)
    if c.is_clip:
      h = norm("pre_norm")(h)
    shallow, deep = self.visual_prompts()
    start, p = num_prefix_tokens(c), 0
    if shallow is not None or deep is not None:  # deep: placeholders, each layer fills its own
      fill = shallow if shallow is not None else jnp.zeros(deep.shape[1:], h.dtype)
      p = fill.shape[0]
      h = insert_prompts(h, fill, start)
    layers = scanned(VisionBlock, c.num_layers, "none", 1)(c, name="layers")
    (last, selected), _ = layers((h, h), k, (jnp.arange(c.num_layers), deep))
    if self.is_initializing():  # create the unused params so checkpoints round-trip
      pooled = norm("post_norm")(last)
      if c.use_head:
        SiglipHead(c, name="head")(pooled)
    return jnp.concatenate([selected[:, :start], selected[:, start + p:]], axis=1)

  def visual_prompts(self):
    """(shallow (p, D) or None, deep (L, p, D) or None), after prompt dropout."""
    shallow = adapters.get(self, PROMPT_TOKENS)
    deep = adapters.get(self, DEEP_PROMPT_TOKENS)
    if shallow is not None and deep is not None:
      raise ValueError("adapters hold both shallow 'prompt_tokens' and 'deep_prompt_tokens'; "
                       "VPT uses one or the other")
    if deep is not None and deep.shape[0] != self.cfg.num_layers:
      raise ValueError(f"deep_prompt_tokens have {deep.shape[0]} layers, the tower "
                       f"{self.cfg.num_layers}")
    rate = adapters.get(self, PROMPT_DROPOUT)
    if rate is None or not self.has_rng("dropout"):
      return shallow, deep
    drop = lambda x: None if x is None else jnp.where(
        jax.random.uniform(self.make_rng("dropout"), x.shape) >= rate, x / (1.0 - rate), 0.0)
    return drop(shallow), drop(deep)
