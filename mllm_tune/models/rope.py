"""Rotary position embeddings of the decoder: inverse frequencies (HF's `default`, `linear` and
`llama3` rope types), sin / cos tables of 1D positions or of M-RoPE (t, h, w) positions (Qwen2-VL
chunked sections, Qwen3-VL interleaved slots), and HF's `rotate_half` application."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from mllm_tune.models.llm_config import RopeConfig


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


def mrope_axes(mrope_section: tuple[int, ...], half: int, interleaved: bool = False) -> np.ndarray:
  """(half,) int: the position axis (0 = t, 1 = h, 2 = w) each frequency slot takes its angle
  from. Chunked (Qwen2-VL / 2.5-VL, `Qwen2VLRotaryEmbedding.recomposition_frequencies`): chunk i
  of the section sizes takes axis i % 3. Interleaved (Qwen3-VL, `Qwen3VLTextRotaryEmbedding.
  recomposition_frequencies`): slot j takes h when j % 3 == 1 and j < 3 * section[1], w when
  j % 3 == 2 and j < 3 * section[2], t otherwise (section[0] is not read)."""
  if not interleaved:
    return np.concatenate([np.full(s, i % 3) for i, s in enumerate(mrope_section)]).astype(
        np.int32)
  j = np.arange(half)
  axes = np.zeros(half, np.int32)
  axes[(j % 3 == 1) & (j < 3 * mrope_section[1])] = 1
  axes[(j % 3 == 2) & (j < 3 * mrope_section[2])] = 2
  return axes


def rope_sin_cos(positions: jax.Array, inv_freq: np.ndarray, mrope_section: tuple[int, ...] = (),
                 interleaved: bool = False) -> tuple[jax.Array, jax.Array]:
  """sin, cos (B, T, H) of positions (B, T), or of M-RoPE positions (3, B, T) with
  `mrope_section`: frequency slot j takes its angle from position axis `mrope_axes(...)[j]`.
  Three equal position rows give exactly the 1D result."""
  inv = jnp.asarray(inv_freq)
  if positions.ndim == 3:
    if positions.shape[0] != 3 or not mrope_section:
      raise ValueError(f"positions of shape {positions.shape}: (3, B, T) M-RoPE positions need a "
                       "model with an mrope_section (Qwen2-VL); others take (B, T)")
    axes = mrope_axes(mrope_section, inv.shape[0], interleaved)
    freqs_BTh = jnp.moveaxis(positions.astype(jnp.float32)[axes], 0, -1) * inv
  else:
    freqs_BTh = positions.astype(jnp.float32)[..., None] * inv[None, None]
  emb_BTH = jnp.concatenate([freqs_BTh, freqs_BTh], axis=-1)
  return jnp.sin(emb_BTH), jnp.cos(emb_BTH)


def apply_rope(x_BTNH: jax.Array, sin_BTH: jax.Array, cos_BTH: jax.Array) -> jax.Array:
  """HF `rotate_half` RoPE (non-interleaved halves)."""
  half = x_BTNH.shape[-1] // 2
  rot = jnp.concatenate([-x_BTNH[..., half:], x_BTNH[..., :half]], axis=-1)
  sin = sin_BTH[:, :, None, :].astype(x_BTNH.dtype)
  cos = cos_BTH[:, :, None, :].astype(x_BTNH.dtype)
  return x_BTNH * cos + rot * sin
