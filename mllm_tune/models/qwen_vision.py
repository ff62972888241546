"""The Qwen2-VL / Qwen2.5-VL / Qwen3-VL vision tower and its patch merger (Flax linen, blocks
scanned).

Mirrors transformers 5.25 `Qwen2VisionTransformerPretrainedModel`,
`Qwen2_5_VisionTransformerPretrainedModel` and `Qwen3VLVisionModel` (`modeling_qwen2_vl.py`,
`modeling_qwen2_5_vl.py`, `modeling_qwen3_vl.py`) on a batch-global buffer of patch rows (see
`models.qwen_vl_host`), or on blocks of it that no image crosses (`QwenVisionTower`):
- `PatchEmbed` (a Conv3d whose kernel equals its stride) is `x @ W.reshape(D, -1).T`: a Linear
  `patch_embed` with kernel (C*T*p*p, D), no bias (Qwen3-VL: with a bias);
- Qwen3-VL adds a learned position table `pos_embed` (side^2, D), resampled bilinearly
  (align_corners=True) to each image's grid: 4 taps per patch (`pos_embed_taps`, the formula of
  transformers' `get_vision_interpolation_indices_and_weights`). The taps are computed in the
  graph from `vision_pos_hw` and the image's grid, which is read off `vision_segment_ids` (the
  largest row / column of the patch's segment), so batches need no further per-patch arrays;
- 2D RoPE (`Qwen2VLVisionRotaryEmbedding`, "axial"): inverse frequencies over head_dim / 2,
  angles `cat(row * inv, col * inv)` duplicated, `rotate_half` applied in float32
  (`apply_rotary_pos_emb_vision`);
- blocks: pre-norm (LayerNorm for 2-VL and 3-VL, RMSNorm for 2.5, eps 1e-6), fused `attn.qkv` +
  `attn.proj` (biases), MLP `fc1 -> act -> fc2` (2-VL, 3-VL) or `down(act(gate) * up)` with
  biases (2.5);
  attention only within an image (the `cu_seqlens` split) and, in Qwen2.5-VL's window layers,
  within a window (`vision_window_ids`): a boolean mask from the host ids, padding rows masked;
- the merger (`PatchMerger`; params under the logical `projector/` path of the composed model,
  so projector presets apply): `ln_q` per patch, m^2 consecutive rows viewed as one, `linear_1`
  (HF `mlp.0`), exact GELU, `linear_2` (HF `mlp.2`);
- Qwen3-VL deepstack: the outputs of the `deepstack_visual_indexes` layers are kept (a scan carry
  (n, P, D)) and each goes through its own merger `projector/deepstack_{i}`, whose LayerNorm
  acts on the m^2 concatenated rows (HF `use_postshuffle_norm=True`).

Param tree (storage, leading axis L on `layers`): patch_embed/{kernel (C*T*p*p, D)[, bias]};
[pos_embed/embedding (side^2, D)];
layers/{norm1,norm2}/{scale[,bias]}; layers/attn/{qkv,proj}/{kernel,bias};
layers/mlp/{fc1,fc2 | gate_proj,up_proj,down_proj}/{kernel,bias}.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from mllm_tune.models.attention import attention
from mllm_tune.models.fused_ops import GATED_ACTS, gated_act
from mllm_tune.models.layers import LayerNorm, Linear, RMSNorm, activation, dtype_of
from mllm_tune.models.stacking import scanned
from mllm_tune.models.qwen_vl_config import QwenVisionConfig


def vision_inv_freq(cfg: QwenVisionConfig) -> np.ndarray:
  """(head_dim / 4,) float32: `1 / theta^(arange(0, d, 2) / d)` with d = head_dim / 2."""
  d = cfg.hidden_size // cfg.num_heads // 2
  return (1.0 / (cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.float32) / d))).astype(
      np.float32)


def vision_sin_cos(pos_hw_P2: jax.Array, cfg: QwenVisionConfig) -> tuple[jax.Array, jax.Array]:
  """float32 sin, cos (..., P, head_dim): angles `cat(row * inv, col * inv)`, duplicated."""
  freqs = pos_hw_P2.astype(jnp.float32)[..., None] * jnp.asarray(vision_inv_freq(cfg))
  half = freqs.reshape(freqs.shape[:-2] + (-1,))  # (.., P, 2 * d/2): rows' angles, then columns'
  emb = jnp.concatenate([half, half], axis=-1)
  return jnp.sin(emb), jnp.cos(emb)


def rope_float32(x_PNH: jax.Array, sin_PH: jax.Array, cos_PH: jax.Array) -> jax.Array:
  """`rotate_half` RoPE computed in float32, cast back to x's dtype."""
  x = x_PNH.astype(jnp.float32)
  half = x.shape[-1] // 2
  rot = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  out = x * cos_PH[..., None, :] + rot * sin_PH[..., None, :]
  return out.astype(x_PNH.dtype)


def pos_embed_taps(pos_hw_P2: jax.Array, segment_ids_P: jax.Array,
                   side: int) -> tuple[jax.Array, jax.Array]:
  """(P, 4) int32 rows of the (side x side) position table and (P, 4) float32 weights that
  resample it bilinearly (align_corners=True) to each patch's image grid: per axis
  `src = i * (side - 1) / max(n - 1, 1)`, taps floor(src) and floor(src) + 1 (clamped), weights
  `max(1 - |src - tap|, 0)`; the 2D taps are the outer product (h-major). The grid (n_h, n_w)
  of a patch is its segment's largest (row, column) + 1; padding rows (segment 0) get some taps,
  their outputs are never read. Ids are counted from the block's smallest one (a block's images
  are numbered consecutively, from any base: ids run over the whole batch)."""
  num = segment_ids_P.shape[0] + 1
  seg = segment_ids_P.astype(jnp.int32)
  real = seg > 0
  seg = jnp.where(real, seg - jnp.min(jnp.where(real, seg, jnp.iinfo(jnp.int32).max)) + 1, 0)
  size_P2 = jax.ops.segment_max(pos_hw_P2.astype(jnp.int32), seg, num_segments=num)[seg] + 1
  src = pos_hw_P2.astype(jnp.float32) * (side - 1) / jnp.maximum(size_P2 - 1, 1).astype(
      jnp.float32)
  floor = jnp.floor(src)
  off = jnp.arange(2, dtype=jnp.float32)
  taps = jnp.clip(floor[..., None].astype(jnp.int32) + jnp.arange(2), 0, side - 1)  # (P, 2, 2)
  weights = jnp.maximum(1 - jnp.abs(src[..., None] - floor[..., None] - off), 0)
  index = (taps[:, 0, :, None] * side + taps[:, 1, None, :]).reshape(-1, 4)
  weight = (weights[:, 0, :, None] * weights[:, 1, None, :]).reshape(-1, 4)
  return index, weight


def attention_masks(segment_ids_P: jax.Array, window_ids_P: jax.Array | None):
  """(full (..., P, P), window (..., P, P) or None) bool: same image (and frame), padding keys
  masked; window also needs the same window (None without window ids)."""
  seg = segment_ids_P
  full = (seg[..., :, None] == seg[..., None, :]) & (seg > 0)[..., None, :]
  if window_ids_P is None:
    return full, None
  return full, full & (window_ids_P[..., :, None] == window_ids_P[..., None, :])


class QwenVisionAttention(nn.Module):
  cfg: QwenVisionConfig

  @nn.compact
  def __call__(self, x_BPD, sin_cos, mask_BPP):
    """Blocks (B, P, D) of patch rows, each attending within itself (masked)."""
    c = self.cfg
    b, p, d = x_BPD.shape
    n = c.num_heads
    qkv = Linear(3 * d, True, c.dtype, c.param_dtype, name="qkv")(x_BPD).reshape(
        b, p, 3, n, d // n)
    q = rope_float32(qkv[:, :, 0], *sin_cos)
    k = rope_float32(qkv[:, :, 1], *sin_cos)
    out = attention(q, k, qkv[:, :, 2], mask_BPP, c.attention_impl,
                    site=c.model_type + "_vision")
    return Linear(d, True, c.dtype, c.param_dtype, name="proj")(out.reshape(b, p, d))


class QwenVisionMLP(nn.Module):
  cfg: QwenVisionConfig

  @nn.compact
  def __call__(self, x_PD):
    c = self.cfg
    lin = lambda f, name: Linear(f, True, c.dtype, c.param_dtype, name=name)
    if not c.windowed:  # Qwen2-VL VisionMlp
      return lin(c.hidden_size, "fc2")(activation(c.hidden_act)(lin(c.intermediate_size, "fc1")(
          x_PD)))
    gate = lin(c.intermediate_size, "gate_proj")(x_PD)  # Qwen2_5_VLMLP(bias=True)
    up = lin(c.intermediate_size, "up_proj")(x_PD)
    h = (gated_act(gate, up, c.hidden_act) if c.hidden_act in GATED_ACTS
         else activation(c.hidden_act)(gate) * up)
    return lin(c.hidden_size, "down_proj")(h)


def _norm(c: QwenVisionConfig, name: str):
  if c.windowed:
    return RMSNorm(c.layer_norm_eps, c.dtype, c.param_dtype, name=name)
  return LayerNorm(c.layer_norm_eps, c.dtype, c.param_dtype, name=name)


class QwenVisionBlock(nn.Module):
  """Pre-norm block in the nn.scan convention: `(carry, sin_cos, masks, (is_full, slot))`; the
  scanned `is_full` picks the full or the window mask for this layer. The carry is h (B, P, D),
  or (h, kept (n, B, P, D)) with deepstack: the block's output is stored at `kept[slot]` when
  slot >= 0."""
  cfg: QwenVisionConfig

  @nn.compact
  def __call__(self, carry, sin_cos, masks, layer_xs):
    c = self.cfg
    is_full, slot = layer_xs
    h_BPD, kept = carry if isinstance(carry, tuple) else (carry, None)
    full, window = masks
    mask = full if window is None else jnp.where(is_full, full, window)
    h_BPD = h_BPD + QwenVisionAttention(c, name="attn")(_norm(c, "norm1")(h_BPD), sin_cos, mask)
    h_BPD = h_BPD + QwenVisionMLP(c, name="mlp")(_norm(c, "norm2")(h_BPD))
    if kept is None:
      return h_BPD, None
    stored = jax.lax.dynamic_update_index_in_dim(kept, h_BPD.astype(kept.dtype),
                                                 jnp.maximum(slot, 0), 0)
    return (h_BPD, jnp.where(slot >= 0, stored, kept)), None


class QwenVisionTower(nn.Module):
  """Patch rows (P, C*T*p*p) -> last hidden states (P, D) (before the merger); with deepstack
  layers (Qwen3-VL) also their outputs (n, P, D).

  Blocked buffers: rows (N, K, C*T*p*p) with ids (N, K, ...) are the buffer of N * K rows
  flattened, under the promise that no image crosses a block of K rows; attention is computed
  per block (N blocks of K x K instead of one (N K)^2 mask), the result is that of the flat
  buffer, returned flat (N * K, D). K must be a multiple of m^2."""
  cfg: QwenVisionConfig

  @nn.compact
  def __call__(self, px_PX, segment_ids_P, pos_hw_P2, window_ids_P=None):
    c = self.cfg
    if px_PX.ndim not in (2, 3) or px_PX.shape[-1] != c.patch_dim:
      raise ValueError(f"pixel_values of shape {px_PX.shape}: this vision tower takes patch rows "
                       f"(P, C*T*p*p) = (P, {c.patch_dim}), or blocks of them (N, K, "
                       f"{c.patch_dim})")
    if px_PX.shape[-2] % c.merge_unit:
      raise ValueError(f"{px_PX.shape[-2]} patch rows (per block) are not a multiple of the "
                       f"merge unit {c.merge_unit}")
    if px_PX.ndim == 2:  # one block
      px_PX, segment_ids_P, pos_hw_P2 = px_PX[None], segment_ids_P[None], pos_hw_P2[None]
      window_ids_P = None if window_ids_P is None else window_ids_P[None]
    if c.windowed and window_ids_P is None:
      raise ValueError(f"{c.model_type}: the window layers need vision_window_ids (P,) "
                       "(models.qwen_vl_host.vision_metadata, mt.hf_inputs)")
    h = Linear(c.hidden_size, c.qwen3, c.dtype, c.param_dtype, name="patch_embed")(px_PX)
    if c.qwen3:
      table = self.param("pos_embed", nn.initializers.normal(0.02),
                         (c.num_position_embeddings, c.hidden_size), dtype_of(c.param_dtype))
      # per block (no image crosses one, so each image's grid is read within its block)
      index, weight = jax.vmap(pos_embed_taps, in_axes=(0, 0, None))(
          pos_hw_P2, segment_ids_P, c.pos_grid_side)
      pos = sum(table[index[..., k]].astype(jnp.float32) * weight[..., k, None]
                for k in range(4))
      h = h + pos.astype(h.dtype)
    sin_cos = vision_sin_cos(pos_hw_P2, c)
    masks = attention_masks(segment_ids_P, window_ids_P if c.windowed else None)
    layers = scanned(QwenVisionBlock, c.num_layers, "none", 2)(c, name="layers")
    deep = c.deepstack_visual_indexes
    slots = np.full(c.num_layers, -1, np.int32)
    slots[list(deep)] = np.arange(len(deep))
    carry = (h, jnp.zeros((len(deep),) + h.shape, h.dtype)) if deep else h
    carry, _ = layers(carry, sin_cos, masks, (jnp.asarray(c.full_attention_layers),
                                              jnp.asarray(slots)))
    if not deep:
      return carry.reshape(-1, carry.shape[-1])
    h, kept = carry
    return h.reshape(-1, h.shape[-1]), kept.reshape(len(deep), -1, kept.shape[-1])


class QwenMerger(nn.Module):
  """(P, D) -> (P / m^2, out_hidden_size): `ln_q`, m^2 consecutive rows as one, linear_1, GELU,
  linear_2 (HF `PatchMerger` / `Qwen2_5_VLPatchMerger` / `Qwen3VLVisionPatchMerger`);
  `postshuffle`: `ln_q` after joining the rows (Qwen3-VL's deepstack mergers). Given the kept
  deepstack outputs (n, P, D), also returns their merged tokens (n, P / m^2, out_hidden_size),
  merger i under `deepstack_{i}`."""
  cfg: QwenVisionConfig
  postshuffle: bool = False

  @nn.compact
  def __call__(self, h_PD, kept_nPD=None):
    c = self.cfg
    width = c.merge_unit * h_PD.shape[-1]
    if self.postshuffle:
      x = _norm(c, "ln_q")(h_PD.reshape(-1, width))
    else:
      x = _norm(c, "ln_q")(h_PD).reshape(-1, width)
    lin = lambda f, name: Linear(f, True, c.dtype, c.param_dtype, name=name)
    x = activation("gelu")(lin(x.shape[-1], "linear_1")(x))
    x = lin(c.out_hidden_size, "linear_2")(x)
    if kept_nPD is None:
      return x
    return x, jnp.stack([QwenMerger(c, True, name=f"deepstack_{i}")(kept_nPD[i])
                         for i in range(kept_nPD.shape[0])])
