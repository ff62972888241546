"""CLIP dual encoder (transformers `CLIPModel`), Flax linen, layers scanned.

Image side: the CLIP ViT of `vision.py` (reused as is), pooled as transformers does,
`post_layernorm(last_hidden[:, 0])`, then `visual_projection`. Text side: a pre-norm transformer
with a causal + key-padding mask, absolute positions `0..T-1` (HF's default `position_ids`),
`final_layer_norm`, pooled at the end-of-text token, then `text_projection`. Embeddings are
L2-normalised and `logits_per_text = exp(logit_scale) * text_emb @ image_emb^T` (M, N),
`logits_per_image` its transpose (N, M) (Radford et al. 2021, eq. in Fig. 3).

EOS pooling follows transformers v5 `CLIPTextModel`: if `eos_token_id == 2` (configs written before
transformers PR #24773) the position of the largest token id in each row (the EOT token is the
largest id in CLIP's vocabulary), else the *first* position holding `eos_token_id` (position 0
when a row has none, as `argmax` of an all-false row).

Param tree (storage, leading axis L on `layers`):
  vision/...                            as `vision.VisionTower` (CLIP), incl. `post_norm`;
  visual_projection/kernel (Dv, P);     text_projection/kernel (Dt, P);     logit_scale ();
  text/embed/{token_embedding (V, Dt), position_embedding (Tmax, Dt)};
  text/layers/{norm1,norm2}/{scale,bias}; text/layers/attn/{q,k,v,out}_proj/{kernel,bias};
  text/layers/mlp/fc{1,2}/{kernel,bias};  text/final_norm/{scale,bias}.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import linen as nn

from mllm_tune.models.config import VisionConfig
from mllm_tune.models.layers import LayerNorm, Linear, dtype_of
from mllm_tune.models.llm import causal_mask
from mllm_tune.models.stacking import scanned
from mllm_tune.models.vision import VisionAttention, VisionMLP, VisionTower

LEGACY_EOS_TOKEN_ID = 2  # transformers: "eos_token_id == 2" means pool at argmax(input_ids)


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
  """HF `CLIPTextConfig` fields we use. Field names match `VisionConfig` where the blocks are
  shared (`VisionMLP` reads hidden_size, intermediate_size, hidden_act, dtype, param_dtype;
  `VisionAttention` reads num_heads and attention_impl)."""
  vocab_size: int = 49408
  hidden_size: int = 512
  intermediate_size: int = 2048
  num_layers: int = 12
  num_heads: int = 8
  max_position_embeddings: int = 77
  layer_norm_eps: float = 1e-5
  hidden_act: str = "quick_gelu"
  eos_token_id: int = 49407
  dtype: str = "float32"
  param_dtype: str = "float32"
  attention_impl: str = "auto"


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  vision: VisionConfig = VisionConfig(hidden_size=768, intermediate_size=3072, num_layers=12,
                                      num_heads=12, image_size=224, patch_size=32)
  text: CLIPTextConfig = CLIPTextConfig()
  projection_dim: int = 512
  logit_scale_init: float = 2.6592
  hf_json: str = ""  # original HF config.json text


class CLIPOutput(NamedTuple):
  logits_per_image: jax.Array  # (N, M) float32
  logits_per_text: jax.Array   # (M, N) float32
  image_embeds: jax.Array      # (N, P) unit norm
  text_embeds: jax.Array       # (M, P) unit norm


def l2_normalize(x_NP: jax.Array) -> jax.Array:
  """x / ||x||_2 over the last axis (HF `_get_vector_norm`, no epsilon)."""
  x = x_NP.astype(jnp.float32)
  return x / jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))


def eos_positions(ids_BT: jax.Array, eos_token_id: int) -> jax.Array:
  """(B,) int: where transformers' `CLIPTextModel` pools each row (see module docstring)."""
  if eos_token_id == LEGACY_EOS_TOKEN_ID:
    return jnp.argmax(ids_BT.astype(jnp.int32), axis=-1)
  return jnp.argmax((ids_BT == eos_token_id).astype(jnp.int32), axis=-1)


def contrastive_logits(image_embeds_NP: jax.Array, text_embeds_MP: jax.Array,
                       logit_scale: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Unit-norm embeddings -> (logits_per_image (N, M), logits_per_text (M, N)),
  `Z = exp(logit_scale) <f(x_i), g(c_j)>`."""
  per_text = jnp.matmul(text_embeds_MP, image_embeds_NP.T) * jnp.exp(
      logit_scale.astype(jnp.float32))
  return per_text.T, per_text


class TextEmbed(nn.Module):
  cfg: CLIPTextConfig

  @nn.compact
  def __call__(self, ids_BT: jax.Array, positions_BT: jax.Array) -> jax.Array:
    c = self.cfg
    pdt, dt = dtype_of(c.param_dtype), dtype_of(c.dtype)
    tok = self.param("token_embedding", nn.initializers.normal(0.02),
                     (c.vocab_size, c.hidden_size), pdt)
    pos = self.param("position_embedding", nn.initializers.normal(0.01),
                     (c.max_position_embeddings, c.hidden_size), pdt)
    return (jnp.take(tok, ids_BT, axis=0) + jnp.take(pos, positions_BT, axis=0)).astype(dt)


class TextBlock(nn.Module):
  """Pre-norm block (HF `CLIPEncoderLayer`) in the `nn.scan` convention (carry, mask, xs)."""
  cfg: CLIPTextConfig

  @nn.compact
  def __call__(self, h_BTD, mask_BTT, layer_index):
    c = self.cfg
    norm = lambda name: LayerNorm(c.layer_norm_eps, c.dtype, c.param_dtype, name=name)
    h_BTD = h_BTD + VisionAttention(c, name="attn")(norm("norm1")(h_BTD), mask_BTT)
    h_BTD = h_BTD + VisionMLP(c, name="mlp")(norm("norm2")(h_BTD))
    return h_BTD, None


class TextTower(nn.Module):
  """`__call__(ids (B, T), mask (B, T) or None)` -> pooled EOS states (B, Dt), after the final
  LayerNorm (HF `CLIPTextModel.pooler_output`)."""
  cfg: CLIPTextConfig

  @nn.compact
  def __call__(self, ids_BT: jax.Array, attention_mask_BT: jax.Array | None = None) -> jax.Array:
    c = self.cfg
    b, t = ids_BT.shape
    if t > c.max_position_embeddings:
      raise ValueError(f"text length {t} exceeds max_position_embeddings="
                       f"{c.max_position_embeddings}")
    if attention_mask_BT is None:
      attention_mask_BT = jnp.ones((b, t), jnp.int32)
    slots = jnp.broadcast_to(jnp.arange(t), (b, t))
    h = TextEmbed(c, name="embed")(ids_BT, slots)
    mask = causal_mask(slots, attention_mask_BT)
    layers = scanned(TextBlock, c.num_layers, "none", 1)(c, name="layers")
    h, _ = layers(h, mask, jnp.arange(c.num_layers))
    h = LayerNorm(c.layer_norm_eps, c.dtype, c.param_dtype, name="final_norm")(h)
    return h[jnp.arange(b), eos_positions(ids_BT, c.eos_token_id)]


class CLIP(nn.Module):
  """`__call__(pixel_values (N, H, W, C) NHWC, input_ids (M, T), attention_mask (M, T))` ->
  `CLIPOutput`; `encode_image` / `encode_text` give the unit-norm embeddings alone."""
  config: CLIPConfig

  def setup(self):
    c = self.config
    if not c.vision.is_clip:
      raise ValueError(f"CLIP needs a clip_vision_model tower, got {c.vision.model_type}")
    self.vision = VisionTower(c.vision)
    self.text = TextTower(c.text)
    self.visual_projection = Linear(c.projection_dim, False, c.vision.dtype,
                                    c.vision.param_dtype)
    self.text_projection = Linear(c.projection_dim, False, c.text.dtype, c.text.param_dtype)
    self.logit_scale = self.param("logit_scale", nn.initializers.constant(c.logit_scale_init),
                                  (), dtype_of(c.vision.param_dtype))

  def encode_image(self, px_NHWC: jax.Array) -> jax.Array:
    """(N, H, W, C) -> unit-norm image embeddings (N, P)."""
    v = self.config.vision
    last_NTD = self.vision(px_NHWC, feature_layer=-1)
    # The tower owns `post_norm` (created at init, unused by LLaVA); apply it to the class token.
    post = self.vision.variables["params"]["post_norm"]
    norm = LayerNorm(v.layer_norm_eps, v.dtype, v.param_dtype, parent=None)
    pooled = norm.apply({"params": post}, last_NTD[:, 0])
    return l2_normalize(self.visual_projection(pooled))

  def encode_text(self, ids_MT: jax.Array, attention_mask_MT: jax.Array | None = None
                  ) -> jax.Array:
    """(M, T) token ids (+ mask) -> unit-norm text embeddings (M, P)."""
    return l2_normalize(self.text_projection(self.text(ids_MT, attention_mask_MT)))

  def __call__(self, pixel_values: jax.Array, input_ids: jax.Array,
               attention_mask: jax.Array | None = None) -> CLIPOutput:
    img = self.encode_image(pixel_values)
    txt = self.encode_text(input_ids, attention_mask)
    per_image, per_text = contrastive_logits(img, txt, self.logit_scale)
    return CLIPOutput(per_image, per_text, img, txt)


def dummy_inputs(cfg: CLIPConfig) -> tuple[jax.Array, jax.Array]:
  v = cfg.vision
  return (jnp.zeros((1, v.image_size, v.image_size, v.num_channels), jnp.float32),
          jnp.zeros((1, 2), jnp.int32))


def init_clip_params(model: CLIP, rng: jax.Array) -> dict:
  """Random params (jitted init) for tests and demos."""
  return jax.jit(lambda r: model.init(r, *dummy_inputs(model.config))["params"])(rng)


def clip_param_shapes(model: CLIP) -> dict:
  """`jax.ShapeDtypeStruct` tree of the params, without allocating them."""
  return jax.eval_shape(lambda: model.init(jax.random.key(0), *dummy_inputs(model.config))[
      "params"])
