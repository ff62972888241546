"""Qwen2-VL / Qwen2.5-VL / Qwen3-VL: vision tower on a batch-global patch buffer -> patch merger
-> merged tokens placed at the image-token positions -> Qwen2 (Qwen3) LLM with M-RoPE.

Mirrors transformers 5.25 `Qwen2VLForConditionalGeneration` / `Qwen2_5_VLForConditionalGeneration`
/ `Qwen3VLForConditionalGeneration` for images and videos (a video is patch rows like an
image's, with t > 1 frame pairs; its merged tokens go to the `video_token_id` positions).
Qwen3-VL's deepstack features (one merger per kept vision layer) are placed at the same
image-token positions, zero elsewhere, and added to the hidden states after the LLM's first n
layers (`llm.add_deepstack`). Inputs (host-built by
`mt.hf_inputs` / `models.qwen_vl_host`; fixed shapes, so a batch recompiles only when a bucket
changes):
  input_ids (B, T)           `image_token_id` (`video_token_id`) at every image (video)
                             position, t*h*w/m^2 per image or video
  attention_mask (B, T)
  positions (3, B, T) int32  M-RoPE ids (`qwen_vl_host.get_rope_index`); required with images,
                             else (B, T) or None (`cumsum(attention_mask) - 1` on all axes)
  pixel_values (P, C*T*p*p)  every image's patch rows in transformers' order, zero-padded; or
                             blocks (N, K, C*T*p*p) (ids (N, K, ...)) no image crosses, each
                             attended alone (`QwenVisionTower`), merged tokens numbered flat
  vision_segment_ids (P,), vision_pos_hw (P, 2), vision_window_ids (P,) (Qwen2.5-VL)
  pack_index (B, T, 1), pack_weight (B, T, 1), pack_newline (B, T)
                             which merged token (row of the P / m^2 merger outputs) each input
                             position receives (`llava.gather_packed`, shared with anyres)
Image and video positions must be exactly the table's filled rows, and there must be as many as
real merged tokens (transformers' `get_placeholder_mask` check): eagerly a ValueError, under jit
NaN logits.
Params: `vision/` (the tower), `projector/` (the merger: ln_q, linear_1, linear_2; Qwen3-VL also
deepstack_{i}/ with the same three), `llm/`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from mllm_tune.models.llava import check_packed_positions, gather_packed
from mllm_tune.models.llm import LLM
from mllm_tune.models.qwen_vision import QwenMerger, QwenVisionTower
from mllm_tune.models.qwen_vl_config import QwenVLConfig

PACK_TABLES = ("pack_index", "pack_weight", "pack_newline")
VISION_IDS = ("vision_segment_ids", "vision_pos_hw", "vision_window_ids")


def check_merged_count(input_ids, segment_ids, token_ids, merge_unit: int):
  """Eager check (skipped under tracing): vision tokens (any of `token_ids`, image and video)
  == real patches / m^2."""
  if any(isinstance(x, jax.core.Tracer) for x in (input_ids, segment_ids)):
    return
  n_tok = int(np.sum(np.isin(np.asarray(input_ids), token_ids)))
  n_patch = int(np.sum(np.asarray(segment_ids) > 0))
  if n_tok * merge_unit != n_patch:
    raise ValueError(f"input_ids hold {n_tok} image / video tokens (ids {token_ids}) but the "
                     f"images and videos have {n_patch} patches = {n_patch / merge_unit:g} "
                     "merged tokens")


def vision_positions(input_ids, cfg: QwenVLConfig):
  """(B, T) bool: the positions that take merged vision tokens (image or video ids)."""
  image, video = cfg.vision_token_ids
  return (input_ids == image) | (input_ids == video)


class QwenVL(nn.Module):
  config: QwenVLConfig

  def setup(self):
    c = self.config
    self.vision = QwenVisionTower(c.vision)
    self.projector = QwenMerger(c.vision)
    self.llm = LLM(c.llm)

  def image_features(self, px_PX, segment_ids_P, pos_hw_P2, window_ids_P=None) -> jax.Array:
    """Patch rows -> merged tokens (P / m^2, D_llm), in patch order."""
    return self.all_image_features(px_PX, segment_ids_P, pos_hw_P2, window_ids_P)[0]

  def all_image_features(self, px_PX, segment_ids_P, pos_hw_P2, window_ids_P=None):
    """(merged tokens (P / m^2, D_llm), deepstack tokens (n, P / m^2, D_llm) or None)."""
    out = self.vision(px_PX, segment_ids_P, pos_hw_P2, window_ids_P)
    if isinstance(out, tuple):
      return self.projector(*out)
    return self.projector(out), None

  def __call__(self, input_ids, attention_mask=None, positions=None, segment_ids=None,
               pixel_values=None, vision_segment_ids=None, vision_pos_hw=None,
               vision_window_ids=None, pack_index=None, pack_weight=None, pack_newline=None,
               kv_cache=None, cache_index=0, last_logits_only=False, return_hidden=False):
    """float32 logits (B, T, V) (and the cache when decoding); see `LLM.__call__`."""
    c = self.config
    v = c.vision
    if self.is_initializing() and pixel_values is None:
      n = v.merge_unit
      self.image_features(jnp.zeros((n, v.patch_dim)), jnp.ones((n,), jnp.int32),
                          jnp.zeros((n, 2), jnp.int32), jnp.zeros((n,), jnp.int32))
    deepstack = None
    if pixel_values is None:  # as HF: without images an image-token id is a plain token
      embeds = self.llm.embed_tokens(input_ids)
    else:
      embeds, deepstack = self._image_embeds(
          input_ids, positions, pixel_values, vision_segment_ids, vision_pos_hw,
          vision_window_ids, pack_index, pack_weight, pack_newline)
    return self.llm(attention_mask=attention_mask, positions=positions, segment_ids=segment_ids,
                    inputs_embeds=embeds, kv_cache=kv_cache, cache_index=cache_index,
                    last_logits_only=last_logits_only, return_hidden=return_hidden,
                    deepstack=deepstack)

  def _image_embeds(self, input_ids, positions, pixel_values, seg, pos_hw, window, pack_index,
                    pack_weight, pack_newline):
    c = self.config
    missing = [k for k, x in zip(("positions", "vision_segment_ids", "vision_pos_hw")
                                 + PACK_TABLES, (positions, seg, pos_hw, pack_index,
                                                 pack_weight, pack_newline)) if x is None]
    if missing:
      raise ValueError(f"{c.model_type}: pixel_values need {missing} (host-built: "
                       "mt.hf_inputs(model, processor_output))")
    if positions.ndim != 3:
      raise ValueError(f"{c.model_type}: with images, positions must be the (3, B, T) M-RoPE ids "
                       f"(qwen_vl_host.get_rope_index), got shape {positions.shape}")
    check_packed_positions(input_ids, pack_weight, pack_newline, c.vision_token_ids)
    check_merged_count(input_ids, seg, c.vision_token_ids, c.vision.merge_unit)
    is_img = vision_positions(input_ids, c)
    embeds = self.llm.embed_tokens(jnp.where(is_img, 0, input_ids))
    feats, deep = self.all_image_features(pixel_values, seg, pos_hw, window)
    place = lambda f: gather_packed(f, pack_index, pack_weight, pack_newline,
                                    jnp.zeros(f.shape[-1], f.dtype))
    embeds = jnp.where(is_img[..., None], place(feats).astype(embeds.dtype), embeds)
    if deep is not None:  # (n, B, T, D), zero away from the image tokens
      deep = jnp.stack([jnp.where(is_img[..., None], place(f).astype(embeds.dtype), 0)
                        for f in deep])
    # Under jit a mismatch poisons the output with NaN (the trainer's NaN guard names it)
    filled = (pack_weight.sum(-1) != 0) | pack_newline.astype(bool)
    ok = jnp.all(filled == is_img) & (
        jnp.sum(is_img) * c.vision.merge_unit == jnp.sum(seg > 0))
    return jnp.where(ok, embeds, jnp.nan), deep
