"""LLaVA: vision tower -> projector -> image features merged at the image-token positions -> LLM.

`input_ids` hold `image_token_id` at every image position.

LLaVA-1.5 (`model_type` "llava"): each image expands to `config.image_seq_len` tokens. Images in
`pixel_values` (N, H, W, C) fill the image-token runs in row-major order over the batch, so any
number of images per sample and text-only samples in the same batch work; the number of image
tokens must equal N * image_seq_len.

Anyres (LLaVA-NeXT / OneVision): `pixel_values` (C, S, S, 3) holds the crops of every image of the
batch (any order; padding crops are zeros), and three position-aligned tables built on the host
(`models.anyres`, `mt.hf_inputs`, the data pipeline) say what each input position receives:
`pack_index` (B, T, K) rows of the flat projected crop features (C * s * s, D), `pack_weight`
(B, T, K), `pack_newline` (B, T) (the position gets `image_newline`). Image positions must be
exactly the positions with a non-zero weight or a newline flag.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from mllm_tune.models.config import LlavaConfig
from mllm_tune.models.layers import Linear, activation
from mllm_tune.models.llm import LLM
from mllm_tune.models.vision import VisionTower


class Projector(nn.Module):
  """`mlp2x_gelu` (HF `LlavaMultiModalProjector`: linear_1, act, linear_2) or `linear`."""
  cfg: LlavaConfig

  @nn.compact
  def __call__(self, feats_NTDv):
    c = self.cfg
    d = c.llm.hidden_size
    lin = lambda name: Linear(d, c.projector_bias, c.llm.dtype, c.llm.param_dtype, name=name)
    if c.projector_type == "linear":
      return lin("linear_1")(feats_NTDv)
    if c.projector_type != "mlp2x_gelu":
      raise ValueError(f"projector_type '{c.projector_type}' unknown (linear | mlp2x_gelu)")
    return lin("linear_2")(activation(c.projector_hidden_act)(lin("linear_1")(feats_NTDv)))


def merge_image_features(embeds_BTD: jax.Array, is_image_BT: jax.Array,
                         image_feats_MD: jax.Array) -> jax.Array:
  """Scatter M image feature rows into the image positions of the embeddings, in order."""
  flat_is_img = is_image_BT.reshape(-1)
  order = jnp.cumsum(flat_is_img) - 1
  idx = jnp.clip(order, 0, image_feats_MD.shape[0] - 1)
  gathered = image_feats_MD[idx].reshape(embeds_BTD.shape).astype(embeds_BTD.dtype)
  return jnp.where(is_image_BT[..., None], gathered, embeds_BTD)


def check_image_token_count(input_ids, pixel_values, image_token_id: int, per_image: int):
  """Eager check (skipped under tracing) that image tokens match the images given."""
  if isinstance(input_ids, jax.core.Tracer) or isinstance(pixel_values, jax.core.Tracer):
    return
  n_tok = int(np.sum(np.asarray(input_ids) == image_token_id))
  n_img = 0 if pixel_values is None else int(pixel_values.shape[0])
  if n_tok != n_img * per_image:
    raise ValueError(f"input_ids hold {n_tok} image tokens (id {image_token_id}) but "
                     f"{n_img} image(s) x {per_image} tokens = {n_img * per_image} were given")


def gather_packed(feats_MD: jax.Array, index_BTK: jax.Array, weight_BTK: jax.Array,
                  newline_BT: jax.Array, newline_D: jax.Array) -> jax.Array:
  """(B, T, D) image-token inputs: sum_k weight * feats[index] (+ image_newline where flagged).
  One tap at a time, so no (B, T, K, D) buffer is built."""
  out = None
  for k in range(index_BTK.shape[-1]):
    tap = feats_MD[index_BTK[..., k]] * weight_BTK[..., k, None].astype(feats_MD.dtype)
    out = tap if out is None else out + tap
  return out + newline_BT[..., None].astype(feats_MD.dtype) * newline_D.astype(feats_MD.dtype)


def check_packed_positions(input_ids, pack_weight, pack_newline, image_token_id):
  """Eager check (skipped under tracing) that the image positions (of `image_token_id`, or of
  any id of a tuple) are the table's rows."""
  if any(isinstance(x, jax.core.Tracer) for x in (input_ids, pack_weight, pack_newline)):
    return
  is_img = np.isin(np.asarray(input_ids), image_token_id)
  filled = (np.asarray(pack_weight).sum(-1) != 0) | np.asarray(pack_newline).astype(bool)
  if not np.array_equal(is_img, filled):
    raise ValueError(f"input_ids hold {int(is_img.sum())} image tokens (id {image_token_id}) "
                     f"but the pack table fills {int(filled.sum())} positions, "
                     f"{int((is_img != filled).sum())} of them differ; build the table from "
                     "the same input_ids (mt.hf_inputs)")


class Llava(nn.Module):
  config: LlavaConfig

  def setup(self):
    c = self.config
    self.vision = VisionTower(c.vision)
    self.projector = Projector(c)
    self.llm = LLM(c.llm)
    # (absent from partial variable trees, e.g. models.head_variables)
    if c.anyres and (self.is_initializing() or self.has_variable("params", "image_newline")):
      d = c.llm.hidden_size
      self.image_newline = self.param(
          "image_newline", nn.initializers.normal(d ** -0.5), (d,),
          jnp.dtype(c.llm.param_dtype))

  def image_features(self, px_NHWC: jax.Array) -> jax.Array:
    """(N, H, W, C) pixels -> (N, image_seq_len, D_llm) projected features."""
    c = self.config
    feats = self.vision(px_NHWC, c.vision_feature_layer)
    if c.vision_feature_select_strategy == "default":
      feats = feats[:, 1:]
    return self.projector(feats)

  def __call__(self, input_ids, attention_mask=None, positions=None, segment_ids=None,
               pixel_values=None, pack_index=None, pack_weight=None, pack_newline=None,
               kv_cache=None, cache_index=0, last_logits_only=False, return_hidden=False):
    """float32 logits (B, T, V) (and the cache when decoding); see `LLM.__call__`."""
    c = self.config
    if self.is_initializing() and pixel_values is None:
      v = c.vision
      self.image_features(jnp.zeros((1, v.image_size, v.image_size, v.num_channels)))
    if c.anyres:
      embeds = self._anyres_embeds(input_ids, pixel_values, pack_index, pack_weight,
                                   pack_newline)
      return self.llm(attention_mask=attention_mask, positions=positions,
                      segment_ids=segment_ids, inputs_embeds=embeds, kv_cache=kv_cache,
                      cache_index=cache_index, last_logits_only=last_logits_only,
                      return_hidden=return_hidden)
    check_image_token_count(input_ids, pixel_values, c.image_token_id, c.image_seq_len)
    if pixel_values is not None:
      is_img = input_ids == c.image_token_id
      embeds = self.llm.embed_tokens(jnp.where(is_img, 0, input_ids))
      feats = self.image_features(pixel_values)
      embeds = merge_image_features(embeds, is_img, feats.reshape(-1, feats.shape[-1]))
      # Under jit the eager count check cannot run: a mismatch poisons the output with NaN
      # (caught by the trainer's NaN guard) instead of silently reusing or dropping features.
      count_ok = jnp.sum(is_img) == feats.shape[0] * feats.shape[1]
      embeds = jnp.where(count_ok, embeds, jnp.nan)
    else:  # as HF: without images an image-token id is embedded like any other token
      embeds = self.llm.embed_tokens(input_ids)
    return self.llm(attention_mask=attention_mask, positions=positions, segment_ids=segment_ids,
                    inputs_embeds=embeds, kv_cache=kv_cache, cache_index=cache_index,
                    last_logits_only=last_logits_only, return_hidden=return_hidden)

  def _anyres_embeds(self, input_ids, pixel_values, pack_index, pack_weight, pack_newline):
    c = self.config
    if pixel_values is None:  # as HF: without images an image-token id is a plain token
      return self.llm.embed_tokens(input_ids)
    if pack_index is None or pack_weight is None or pack_newline is None:
      raise ValueError(f"{c.model_type}: pixel_values need the pack tables (pack_index, "
                       "pack_weight, pack_newline); mt.hf_inputs builds them from a processor's "
                       "output")
    check_packed_positions(input_ids, pack_weight, pack_newline, c.vision_token_ids)
    is_img = functools.reduce(jnp.logical_or, [input_ids == t for t in c.vision_token_ids])
    embeds = self.llm.embed_tokens(jnp.where(is_img, 0, input_ids))
    feats = self.image_features(pixel_values)
    img = gather_packed(feats.reshape(-1, feats.shape[-1]), pack_index, pack_weight,
                        pack_newline, self.image_newline)
    embeds = jnp.where(is_img[..., None], img.astype(embeds.dtype), embeds)
    # Under jit a mismatch poisons the output with NaN (the trainer's NaN guard names it)
    filled = (pack_weight.sum(-1) != 0) | pack_newline.astype(bool)
    return jnp.where(jnp.all(filled == is_img), embeds, jnp.nan)
