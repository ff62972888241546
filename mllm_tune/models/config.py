"""Model configurations: frozen (hashable) dataclasses, parsed from and written to HF `config.json`.

Three parts, mirroring a LLaVA checkpoint: `VisionConfig` (CLIP or SigLIP ViT), `LLMConfig`
(Llama / Qwen2 / Mistral decoder, `llm_config.py`) and `LlavaConfig` (the composition and its
projector). A bare LLM checkpoint gives a `CausalLMConfig`; Qwen2-VL / 2.5-VL / 3-VL give a
`QwenVLConfig` (`qwen_vl_config.py`); `config_from_hf` / `config_to_hf` dispatch on `model_type`.
Configs are hashable so a model can be a static `jit` argument; the original HF dict is kept (as
JSON text) so unknown fields survive a round trip.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

from mllm_tune.models.llm_config import (LLM_ARCHITECTURES, LLM_TYPES, ROPE_TYPES, ConfigError,
                                         LLMConfig, RopeConfig, _need, _rope_from_hf,
                                         _rope_to_hf, llm_config_from_hf, llm_config_to_hf)
from mllm_tune.models.qwen_vl_config import (QWEN_VL_TYPES, QwenVisionConfig, QwenVLConfig,
                                             qwen_vl_config_from_dict, qwen_vl_config_from_hf,
                                             qwen_vl_config_to_hf)

VISION_TYPES = ("clip_vision_model", "siglip_vision_model")
# models.attention: auto (cuDNN where the backend takes the call, lse elsewhere; the default),
# lse (our custom-VJP attention), xla / cudnn (jax.nn.dot_product_attention's implementations)
ATTENTION_IMPLS = ("auto", "lse", "xla", "cudnn")
# fields that change how a model runs, not what it computes (left out of architecture hashes)
RUNTIME_FIELDS = ("dtype", "param_dtype", "remat_policy", "attention_impl", "scan_unroll",
                  "decode_per_layer", "moe_capacity_factor")
# fields that change neither the architecture nor the numbers (left out of Fisher hashes);
# pad_token_id changes only which embedding row gets no gradient, so a Fisher stored before it
# was read still fits
NON_ARCH_FIELDS = RUNTIME_FIELDS + ("scan_layers", "generation_json", "pad_token_id")
# fields added after architecture hashes were first stored, with the value every earlier config
# had: left out of the hash at that value, so stored hashes stay valid (importance.store)
LATER_FIELDS = {"qk_norm": False, "mrope_interleaved": False, "num_position_embeddings": 0,
                "deepstack_visual_indexes": (), "num_experts": 0, "num_experts_per_tok": 0,
                "moe_intermediate_size": 0}


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  model_type: str = "clip_vision_model"
  hidden_size: int = 1024
  intermediate_size: int = 4096
  num_layers: int = 24
  num_heads: int = 16
  image_size: int = 336
  patch_size: int = 14
  num_channels: int = 3
  layer_norm_eps: float = 1e-5
  hidden_act: str = "quick_gelu"
  use_head: bool = False  # SigLIP attention-pooling head (kept for round trips, unused by LLaVA)
  dtype: str = "float32"
  param_dtype: str = "float32"
  attention_impl: str = "auto"  # ATTENTION_IMPLS (models.attention)

  @property
  def is_clip(self) -> bool:
    return self.model_type == "clip_vision_model"

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  @property
  def num_positions(self) -> int:
    return self.num_patches + (1 if self.is_clip else 0)


LLAVA_TYPES = ("llava", "llava_next", "llava_onevision")
LLAVA_ARCHITECTURES = {"llava": "LlavaForConditionalGeneration",
                       "llava_next": "LlavaNextForConditionalGeneration",
                       "llava_onevision": "LlavaOnevisionForConditionalGeneration"}
# transformers' class defaults for what a config.json may leave out
DEFAULT_PINPOINTS = {
    "llava_next": ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)),
    "llava_onevision": tuple((384 * i, 384 * j) for i in range(1, 7) for j in range(1, 7))}
FAMILY_DEFAULTS = {  # vision_feature_layer, vision_feature_select_strategy, text model_type
    "llava": (-2, "default", "llama"), "llava_next": (-2, "default", "llama"),
    "llava_onevision": (-1, "full", "qwen2")}


@dataclasses.dataclass(frozen=True)
class LlavaConfig:
  """A LLaVA composition. `model_type` "llava" (1.5: one fixed-size image -> `image_seq_len`
  tokens) or an anyres family, "llava_next" / "llava_onevision" (a variable number of crops and
  tokens per image, `models.anyres`; an `image_newline` parameter)."""
  vision: VisionConfig = VisionConfig()
  llm: LLMConfig = LLMConfig()
  projector_type: str = "mlp2x_gelu"  # mlp2x_gelu (HF Llava) | linear
  projector_hidden_act: str = "gelu"
  projector_bias: bool = True
  image_token_id: int = 32000
  vision_feature_layer: int = -2
  vision_feature_select_strategy: str = "default"  # default (drop CLS) | full
  model_type: str = "llava"  # LLAVA_TYPES
  image_grid_pinpoints: tuple[tuple[int, int], ...] = ()  # anyres: (height, width) resolutions
  vision_aspect_ratio: str = "anyres_max_9"  # llava_onevision: cap on the grid's feature area
  video_token_id: int = -1  # llava_onevision: the video placeholder id (-1: no videos)
  hf_json: str = ""  # original HF config.json text, for round trips
  hf_layout: str = ""  # checkpoint key layout read (checkpoints.hf.LLAVA_LAYOUTS), written back
  generation_json: str = ""  # the checkpoint's generation_config.json text (generation defaults)

  def __post_init__(self):
    if self.model_type not in LLAVA_TYPES:
      raise ConfigError(f"LlavaConfig.model_type {self.model_type!r}: expected one of "
                        f"{LLAVA_TYPES}")
    pins = tuple((int(h), int(w)) for h, w in self.image_grid_pinpoints)
    object.__setattr__(self, "image_grid_pinpoints", pins)
    if self.anyres:
      if not pins:
        raise ConfigError(f"{self.model_type}: image_grid_pinpoints are required")
      crop = self.vision.image_size
      bad = [p for p in pins if p[0] % crop or p[1] % crop]
      if bad:
        raise ConfigError(f"image_grid_pinpoints {bad} are not multiples of the vision "
                          f"tower's image_size {crop}")

  @property
  def anyres(self) -> bool:
    """Variable crops and tokens per image (LLaVA-NeXT / OneVision)."""
    return self.model_type != "llava"

  @property
  def crop_side(self) -> int:
    """Features per side of one crop's feature map (image_size / patch_size)."""
    return self.vision.image_size // self.vision.patch_size

  @property
  def vision_token_ids(self) -> tuple[int, ...]:
    """The ids whose positions take vision features: the image id (and OneVision's video id)."""
    if self.model_type == "llava_onevision" and self.video_token_id >= 0:
      return self.image_token_id, self.video_token_id
    return (self.image_token_id,)

  @property
  def crop_tokens(self) -> int:
    """Projected features one crop (one vision-tower image) gives."""
    n = self.vision.num_positions
    return n - 1 if self.vision_feature_select_strategy == "default" else n

  @property
  def image_seq_len(self) -> int:
    """Image tokens one image expands to in the LLM input (fixed for LLaVA-1.5 only)."""
    if self.anyres:
      raise ConfigError(f"{self.model_type}: the number of tokens depends on each image's "
                        "size (models.anyres.pack_table); there is no fixed image_seq_len")
    return self.crop_tokens


@dataclasses.dataclass(frozen=True)
class CausalLMConfig:
  llm: LLMConfig = LLMConfig()
  hf_json: str = ""
  generation_json: str = ""  # the checkpoint's generation_config.json text


# ----------------------------------------------------------------------------- HF -> ours
def vision_config_from_hf(d: dict, where: str = "config.json:vision_config",
                          **overrides) -> VisionConfig:
  mt = d.get("model_type", "clip_vision_model")
  if mt not in VISION_TYPES:
    raise ConfigError(f"{where}: vision model_type '{mt}' is not supported "
                      f"(supported: {VISION_TYPES})")
  is_clip = mt == "clip_vision_model"
  cfg = VisionConfig(
      model_type=mt, hidden_size=int(_need(d, "hidden_size", where)),
      intermediate_size=int(_need(d, "intermediate_size", where)),
      num_layers=int(_need(d, "num_hidden_layers", where)),
      num_heads=int(_need(d, "num_attention_heads", where)),
      image_size=int(_need(d, "image_size", where)), patch_size=int(_need(d, "patch_size", where)),
      num_channels=int(d.get("num_channels", 3)),
      layer_norm_eps=float(d.get("layer_norm_eps", 1e-5 if is_clip else 1e-6)),
      hidden_act=d.get("hidden_act", "quick_gelu" if is_clip else "gelu_pytorch_tanh"),
      use_head=(not is_clip) and bool(d.get("vision_use_head", True)))
  return dataclasses.replace(cfg, **overrides)


def config_from_hf(d: dict, where: str = "config.json", dtype: str = "float32",
                   param_dtype: str = "float32") -> LlavaConfig | CausalLMConfig | QwenVLConfig:
  """Parse a full HF `config.json` dict into our config; errors name the file and field."""
  archs = d.get("architectures") or []
  mt = d.get("model_type")
  if mt in LLAVA_TYPES:
    return _llava_config_from_hf(d, mt, where, dtype, param_dtype)
  if mt in QWEN_VL_TYPES:
    return qwen_vl_config_from_hf(d, where, dtype, param_dtype)
  if mt in LLM_TYPES:
    if archs and archs[0] != LLM_ARCHITECTURES[mt]:
      raise ConfigError(f"{where}: architectures {archs} not supported for model_type '{mt}' "
                        f"(expected {LLM_ARCHITECTURES[mt]})")
    return CausalLMConfig(llm=llm_config_from_hf(d, where, dtype=dtype, param_dtype=param_dtype),
                          hf_json=json.dumps(d, sort_keys=True))
  raise ConfigError(f"{where}: model_type '{mt}' (architectures {archs}) is not supported; "
                    "supported: "
                    f"{', '.join(repr(t) for t in LLAVA_TYPES + LLM_TYPES + QWEN_VL_TYPES)}")


def _llava_config_from_hf(d: dict, mt: str, where: str, dtype: str,
                          param_dtype: str) -> LlavaConfig:
  archs = d.get("architectures") or []
  arch = LLAVA_ARCHITECTURES[mt]
  if archs and not set(archs) & {arch, arch.replace("ForConditionalGeneration", "Model")}:
    raise ConfigError(f"{where}: architectures {archs} not supported for model_type '{mt}' "
                      f"(expected {arch})")
  layer_default, strategy_default, text_type = FAMILY_DEFAULTS[mt]
  text = dict(_need(d, "text_config", where))
  text.setdefault("model_type", text_type)
  vision = dict(_need(d, "vision_config", where))
  if mt == "llava_onevision":
    vision.setdefault("model_type", "siglip_vision_model")
  layer = d.get("vision_feature_layer", layer_default)
  if not isinstance(layer, int):
    raise ConfigError(f"{where}: vision_feature_layer={layer!r}: only a single int layer is "
                      "supported")
  strategy = d.get("vision_feature_select_strategy", strategy_default)
  if strategy not in ("default", "full"):
    raise ConfigError(f"{where}: vision_feature_select_strategy '{strategy}' is not supported")
  if d.get("tie_word_embeddings"):
    text["tie_word_embeddings"] = True
  llm = llm_config_from_hf(text, f"{where}:text_config", dtype=dtype, param_dtype=param_dtype)
  vis = vision_config_from_hf(vision, f"{where}:vision_config", dtype=dtype,
                              param_dtype=param_dtype)
  if not -vis.num_layers - 1 <= layer <= vis.num_layers:
    raise ConfigError(f"{where}: vision_feature_layer={layer} is out of range for a "
                      f"{vis.num_layers}-layer vision tower")
  extra = {}
  if mt != "llava":
    pins = d.get("image_grid_pinpoints") or DEFAULT_PINPOINTS[mt]
    if not all(isinstance(p, (list, tuple)) and len(p) == 2 for p in pins):
      raise ConfigError(f"{where}: image_grid_pinpoints must be [height, width] pairs")
    extra = dict(model_type=mt, image_grid_pinpoints=tuple(tuple(p) for p in pins))
    if mt == "llava_onevision":
      aspect = d.get("vision_aspect_ratio", "anyres_max_9")
      if not str(aspect).startswith("anyres_max_"):
        raise ConfigError(f"{where}: vision_aspect_ratio {aspect!r} is not supported "
                          "(expected 'anyres_max_<N>')")
      extra["vision_aspect_ratio"] = aspect
      video = d.get("video_token_index", d.get("video_token_id"))
      if video is not None:
        extra["video_token_id"] = int(video)
  return LlavaConfig(
      vision=vis, llm=llm, projector_type="mlp2x_gelu",
      projector_hidden_act=d.get("projector_hidden_act", "gelu"),
      projector_bias=bool(d.get("multimodal_projector_bias", True)),
      image_token_id=int(d.get("image_token_id", d.get("image_token_index", 32000))),
      vision_feature_layer=layer, vision_feature_select_strategy=strategy,
      hf_json=json.dumps(d, sort_keys=True), **extra)


def with_runtime(cfg: LlavaConfig | CausalLMConfig, **fields) -> LlavaConfig | CausalLMConfig:
  """`cfg` with runtime fields (`RUNTIME_FIELDS`: compute dtype, remat policy, attention
  implementation, ...) replaced in the LLM and, for those it has, the vision tower."""
  unknown = set(fields) - set(RUNTIME_FIELDS)
  if unknown:
    raise ConfigError(f"not runtime fields: {sorted(unknown)}; runtime fields: {RUNTIME_FIELDS}")
  impl = fields.get("attention_impl", "auto")
  if impl not in ATTENTION_IMPLS:
    raise ConfigError(f"model.attention_impl must be one of {ATTENTION_IMPLS}, got {impl!r}")
  unroll = fields.get("scan_unroll", 1)
  if isinstance(unroll, bool) or not isinstance(unroll, int) or unroll < 1:
    raise ConfigError(f"scan_unroll must be an integer >= 1, got {unroll!r}")
  if not isinstance(fields.get("decode_per_layer", True), bool):
    raise ConfigError(f"decode_per_layer must be True or False, got "
                      f"{fields['decode_per_layer']!r}")
  llm = dataclasses.replace(cfg.llm, **fields)
  if isinstance(cfg, CausalLMConfig):
    return dataclasses.replace(cfg, llm=llm)
  names = {f.name for f in dataclasses.fields(cfg.vision)}
  vis_fields = {k: v for k, v in fields.items() if k in names}
  return dataclasses.replace(cfg, llm=llm, vision=dataclasses.replace(cfg.vision, **vis_fields))


# ----------------------------------------------------------------------------- ours -> HF
def vision_config_to_hf(c: VisionConfig) -> dict:
  d = {"model_type": c.model_type, "hidden_size": c.hidden_size,
       "intermediate_size": c.intermediate_size, "num_hidden_layers": c.num_layers,
       "num_attention_heads": c.num_heads, "image_size": c.image_size,
       "patch_size": c.patch_size, "num_channels": c.num_channels,
       "layer_norm_eps": c.layer_norm_eps, "hidden_act": c.hidden_act}
  if not c.is_clip:
    d["vision_use_head"] = c.use_head
  return d


def config_to_hf(cfg: LlavaConfig | CausalLMConfig, dtype: str) -> dict:
  """Our config -> HF `config.json` dict, over the original dict when there is one."""
  if isinstance(cfg, QwenVLConfig):
    return qwen_vl_config_to_hf(cfg, dtype)
  base = json.loads(cfg.hf_json) if cfg.hf_json else {}
  if isinstance(cfg, CausalLMConfig):
    d = {**base, **llm_config_to_hf(cfg.llm)}
    d["architectures"] = [LLM_ARCHITECTURES[cfg.llm.model_type]]
  else:
    if cfg.projector_type != "mlp2x_gelu":
      raise ConfigError(f"projector_type '{cfg.projector_type}' has no HF Llava equivalent; "
                        "only 'mlp2x_gelu' can be exported")
    d = dict(base)
    d["text_config"] = {**base.get("text_config", {}), **llm_config_to_hf(cfg.llm)}
    d["vision_config"] = {**base.get("vision_config", {}), **vision_config_to_hf(cfg.vision)}
    d.update(model_type=cfg.model_type, architectures=[LLAVA_ARCHITECTURES[cfg.model_type]],
             projector_hidden_act=cfg.projector_hidden_act,
             multimodal_projector_bias=cfg.projector_bias,
             vision_feature_layer=cfg.vision_feature_layer,
             vision_feature_select_strategy=cfg.vision_feature_select_strategy,
             tie_word_embeddings=cfg.llm.tie_word_embeddings)
    if cfg.anyres:  # these configs name the field image_token_index
      d["image_token_index"] = cfg.image_token_id
      d.pop("image_token_id", None)
      d["image_grid_pinpoints"] = [list(p) for p in cfg.image_grid_pinpoints]
      if cfg.model_type == "llava_onevision":
        d["vision_aspect_ratio"] = cfg.vision_aspect_ratio
        if cfg.video_token_id >= 0:
          d["video_token_index"] = cfg.video_token_id
          d.pop("video_token_id", None)
    else:
      d.update(image_token_id=cfg.image_token_id, image_seq_length=cfg.image_seq_len)
      d.pop("image_token_index", None)
  d.pop("torch_dtype", None)
  d["dtype"] = dtype
  return d


# ----------------------------------------------------------------------------- ours <-> JSON
def config_to_dict(cfg: LlavaConfig | CausalLMConfig) -> dict:
  """Plain-JSON form of our config (for native checkpoints and run directories)."""
  d = dataclasses.asdict(cfg)
  d["kind"] = ("llava" if isinstance(cfg, LlavaConfig) else
               "qwen_vl" if isinstance(cfg, QwenVLConfig) else "causal_lm")
  return d


def config_from_dict(d: dict) -> LlavaConfig | CausalLMConfig:
  d = dict(d)
  kind = d.pop("kind", None)

  def build(cls, sub: dict, where: str):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(sub) - names)
    if unknown:
      raise ConfigError(f"{where}: unknown field(s) {unknown} for {cls.__name__}")
    return cls(**sub)

  def llm(sub: dict) -> LLMConfig:
    sub = dict(sub)
    sub["rope"] = build(RopeConfig, sub.get("rope", {}), "llm.rope")
    return build(LLMConfig, sub, "llm")

  if kind == "llava":
    d["llm"] = llm(d["llm"])
    d["vision"] = build(VisionConfig, d["vision"], "vision")
    if d.get("model_type") == "llava_onevision" and "video_token_id" not in d:
      hf = json.loads(d.get("hf_json") or "{}")  # written before the field existed
      d["video_token_id"] = int(hf.get("video_token_index", hf.get("video_token_id", -1)))
    if "image_grid_pinpoints" in d:
      d["image_grid_pinpoints"] = tuple(tuple(p) for p in d["image_grid_pinpoints"])
    return build(LlavaConfig, d, "config")
  if kind == "causal_lm":
    d["llm"] = llm(d["llm"])
    return build(CausalLMConfig, d, "config")
  if kind == "qwen_vl":
    return qwen_vl_config_from_dict(d, llm(d["llm"]), build)
  raise ConfigError(f"config 'kind' must be 'llava', 'qwen_vl' or 'causal_lm', got {kind!r}")
