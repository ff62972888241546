"""Qwen2-VL / Qwen2.5-VL / Qwen3-VL configurations, parsed from and written to HF `config.json`
dicts.

`QwenVLConfig` = `QwenVisionConfig` (the ViT and its 2x2 patch merger) + our Qwen2 (Qwen3 for
Qwen3-VL) `LLMConfig` with M-RoPE (`rope.mrope_section`) + the special token ids. Two
`config.json` forms are read:
- the hub's **flat** form (Qwen2-VL / 2.5-VL): text fields at the top level,
  `rope_scaling={"type": "mrope", "mrope_section": [...]}` + `rope_theta`, and a `vision_config`;
- the **nested** form transformers 5 `save_pretrained` writes (and the Qwen3-VL hub configs, whose
  `text_config` has `rope_scaling` + `rope_theta`): `text_config` (with `rope_parameters`) and
  `vision_config` (with `rope_parameters={"rope_type": "axial"}`).
A config is written back in the form it was read (nested for configs built from scratch), over
the original dict so unknown fields survive. Absent fields take transformers 5.25's class
defaults (`configuration_qwen2_vl.py`, `configuration_qwen2_5_vl.py`, `configuration_qwen3_vl.py`).

Vision fields, family by family (HF name -> ours):
  qwen2_vl:   embed_dim -> hidden_size, embed_dim * mlp_ratio -> intermediate_size,
              hidden_size (the LLM width) -> out_hidden_size; LayerNorm, fc1 -> act -> fc2
  qwen2_5_vl: hidden_size, intermediate_size, out_hidden_size as named; RMSNorm, gated MLP with
              biases, window attention except in `fullatt_block_indexes`
  qwen3_vl:   hidden_size, intermediate_size, out_hidden_size as named; LayerNorm, fc1 -> act ->
              fc2 (HF `linear_fc1` / `linear_fc2`), a biased patch embedding, a learned position
              table of `num_position_embeddings` (a square grid, resampled to each image), and
              `deepstack_visual_indexes`: layers whose outputs feed the LLM's first layers
Qwen3-VL's text model is Qwen3 (`head_dim` of its own, q/k RMSNorm, `attention_bias`) with
interleaved M-RoPE (default sections [24, 20, 20], `rope.mrope_axes`).
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

from mllm_tune.models.llm_config import (ConfigError, LLMConfig, _need, llm_config_from_hf,
                                         llm_config_to_hf)

QWEN_VL_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")
QWEN3_VL_TYPES = ("qwen3_vl", "qwen3_vl_moe")  # the Qwen3-VL tower and a Qwen3 text model
QWEN_VL_ARCHITECTURES = {"qwen2_vl": "Qwen2VLForConditionalGeneration",
                         "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
                         "qwen3_vl": "Qwen3VLForConditionalGeneration",
                         "qwen3_vl_moe": "Qwen3VLMoeForConditionalGeneration"}
VISION_DEFAULTS = {  # transformers 5.25 Qwen2VLVisionConfig / Qwen2_5_VLVisionConfig defaults
    "qwen2_vl": dict(depth=32, embed_dim=1280, hidden_size=3584, hidden_act="quick_gelu",
                     mlp_ratio=4, num_heads=16, in_channels=3, patch_size=14,
                     spatial_merge_size=2, temporal_patch_size=2),
    "qwen2_5_vl": dict(depth=32, hidden_size=3584, hidden_act="silu", intermediate_size=3420,
                       num_heads=16, in_channels=3, patch_size=14, spatial_merge_size=2,
                       temporal_patch_size=2, tokens_per_second=4, window_size=112,
                       out_hidden_size=3584, fullatt_block_indexes=[7, 15, 23, 31]),
    "qwen3_vl": dict(depth=27, hidden_size=1152, hidden_act="gelu_pytorch_tanh",
                     intermediate_size=4304, num_heads=16, in_channels=3, patch_size=16,
                     spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=3584,
                     num_position_embeddings=2304, deepstack_visual_indexes=[8, 16, 24]),
}
VISION_DEFAULTS["qwen3_vl_moe"] = VISION_DEFAULTS["qwen3_vl"]
VISION_ALIASES = {"in_channels": "in_chans", "patch_size": "spatial_patch_size"}  # hub names
TEXT_DEFAULTS = {  # transformers 5.25 Qwen2VLTextConfig / Qwen3VLTextConfig defaults
    "qwen2": dict(rms_norm_eps=1e-5, max_position_embeddings=32768, num_key_value_heads=8),
    "qwen3": dict(rms_norm_eps=1e-6, max_position_embeddings=128000, num_key_value_heads=32,
                  head_dim=128, attention_bias=False)}
MOE_TEXT_DEFAULTS = dict(  # transformers 5.25 Qwen3VLMoeTextConfig (head_dim None: hidden / heads)
    num_key_value_heads=16, head_dim=None, num_experts=60, num_experts_per_tok=4,
    moe_intermediate_size=1408)
DEFAULT_THETA = {"qwen2": 1e6, "qwen3": 5e5}  # the text configs' default_theta
QWEN3_MROPE_SECTION = (24, 20, 20)  # Qwen3VLTextRotaryEmbedding's default
TOKEN_DEFAULTS = dict(image_token_id=151655, video_token_id=151656,
                      vision_start_token_id=151652, vision_end_token_id=151653)


@dataclasses.dataclass(frozen=True)
class QwenVisionConfig:
  """The Qwen2-VL / Qwen2.5-VL / Qwen3-VL vision tower (`model_type` names the family)."""
  model_type: str = "qwen2_vl"  # QWEN_VL_TYPES
  hidden_size: int = 1280       # ViT width
  intermediate_size: int = 5120
  out_hidden_size: int = 3584   # merger output = the LLM width
  num_layers: int = 32
  num_heads: int = 16
  num_channels: int = 3
  patch_size: int = 14
  temporal_patch_size: int = 2
  spatial_merge_size: int = 2
  hidden_act: str = "quick_gelu"
  window_size: int = 0          # qwen2_5_vl: window side in pixels (112: 4x4 merged tokens)
  fullatt_block_indexes: tuple[int, ...] = ()  # qwen2_5_vl: layers with full attention
  tokens_per_second: int = 4    # qwen2_5_vl videos (carried for round trips)
  num_position_embeddings: int = 0  # qwen3_vl: learned position table (side^2 rows)
  deepstack_visual_indexes: tuple[int, ...] = ()  # qwen3_vl: layers feeding the LLM's first ones
  rope_theta: float = 10000.0   # 2D ("axial") vision RoPE
  layer_norm_eps: float = 1e-6
  dtype: str = "float32"
  param_dtype: str = "float32"
  attention_impl: str = "auto"

  def __post_init__(self):
    object.__setattr__(self, "fullatt_block_indexes",
                       tuple(int(i) for i in self.fullatt_block_indexes))
    object.__setattr__(self, "deepstack_visual_indexes",
                       tuple(int(i) for i in self.deepstack_visual_indexes))
    if self.model_type not in QWEN_VL_TYPES:
      raise ConfigError(f"QwenVisionConfig.model_type {self.model_type!r}: expected one of "
                        f"{QWEN_VL_TYPES}")
    if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 4:
      raise ConfigError(f"vision hidden_size {self.hidden_size} / num_heads {self.num_heads} "
                        "must be a head dim divisible by 4 (2D RoPE over h and w halves)")
    if self.windowed and self.window_merge < 1:
      raise ConfigError(f"vision window_size {self.window_size} is smaller than one merged "
                        f"token ({self.spatial_merge_size} x {self.patch_size} pixels)")
    if self.qwen3:
      if self.pos_grid_side < 1:
        raise ConfigError(f"vision num_position_embeddings {self.num_position_embeddings}: a "
                          "qwen3_vl tower needs a learned position table (>= 1 rows)")
      ds = self.deepstack_visual_indexes
      if list(ds) != sorted(set(ds)) or (ds and not 0 <= ds[0] <= ds[-1] < self.num_layers):
        raise ConfigError(f"vision deepstack_visual_indexes {list(ds)} must be increasing "
                          f"layer indexes below depth {self.num_layers}")
    elif self.deepstack_visual_indexes or self.num_position_embeddings:
      raise ConfigError(f"{self.model_type}: deepstack_visual_indexes / num_position_embeddings "
                        "are Qwen3-VL fields")

  @property
  def qwen3(self) -> bool:
    """Qwen3-VL: biased patch embedding, learned position table, deepstack mergers."""
    return self.model_type in QWEN3_VL_TYPES

  @property
  def pos_grid_side(self) -> int:
    """Side of the square learned position grid (transformers' `num_grid_per_side`)."""
    return int(self.num_position_embeddings ** 0.5)

  @property
  def windowed(self) -> bool:
    """Qwen2.5-VL: window attention in the layers not in `fullatt_block_indexes`."""
    return self.model_type == "qwen2_5_vl"

  @property
  def window_merge(self) -> int:
    """Merged tokens per window side (transformers' `vit_merger_window_size`)."""
    return self.window_size // self.spatial_merge_size // self.patch_size

  @property
  def full_attention_layers(self) -> tuple[bool, ...]:
    """Per layer: attends over its whole image (True) or within its window (False)."""
    if not self.windowed:
      return (True,) * self.num_layers
    return tuple(i in self.fullatt_block_indexes for i in range(self.num_layers))

  @property
  def patch_dim(self) -> int:
    """Width of one `pixel_values` row: C * T * p * p."""
    return self.num_channels * self.temporal_patch_size * self.patch_size ** 2

  @property
  def merge_unit(self) -> int:
    """Patches per merged token (m^2)."""
    return self.spatial_merge_size ** 2


@dataclasses.dataclass(frozen=True)
class QwenVLConfig:
  """Qwen2-VL (`model_type` "qwen2_vl"), Qwen2.5-VL ("qwen2_5_vl"), Qwen3-VL ("qwen3_vl") or
  Qwen3-VL-MoE ("qwen3_vl_moe": the Qwen3-VL tower and a mixture-of-experts Qwen3 text model)."""
  vision: QwenVisionConfig = QwenVisionConfig()
  llm: LLMConfig = LLMConfig()
  model_type: str = "qwen2_vl"
  image_token_id: int = 151655
  video_token_id: int = 151656
  vision_start_token_id: int = 151652
  vision_end_token_id: int = 151653
  hf_json: str = ""    # original HF config.json text, for round trips
  hf_layout: str = ""  # checkpoint key layout read (checkpoints.hf.QWEN_VL_LAYOUTS), written back
  generation_json: str = ""  # the checkpoint's generation_config.json text

  def __post_init__(self):
    if self.model_type not in QWEN_VL_TYPES:
      raise ConfigError(f"QwenVLConfig.model_type {self.model_type!r}: expected one of "
                        f"{QWEN_VL_TYPES}")
    if self.vision.model_type != self.model_type:
      raise ConfigError(f"vision config of family {self.vision.model_type!r} in a "
                        f"{self.model_type!r} model")
    if self.vision.out_hidden_size != self.llm.hidden_size:
      raise ConfigError(f"the vision merger outputs {self.vision.out_hidden_size} features but "
                        f"the LLM width is {self.llm.hidden_size}")

  @property
  def vision_token_ids(self) -> tuple[int, int]:
    """The ids whose positions take merged vision tokens: (image, video)."""
    return self.image_token_id, self.video_token_id

  @property
  def video_time_step(self) -> int | None:
    """Qwen2.5-VL: `tokens_per_second` (the temporal M-RoPE step of a video frame is
    tokens_per_second x second_per_grid_t); other families: None (the frame index)."""
    return self.vision.tokens_per_second if self.model_type == "qwen2_5_vl" else None

  @property
  def split_video_frames(self) -> bool:
    """Qwen3-VL: every video frame is a run of its own between timestamp tokens."""
    return self.vision.qwen3


# ----------------------------------------------------------------------------- HF -> ours
def _vision_from_hf(v: dict, mt: str, where: str, dtype: str, param_dtype: str):
  dflt = VISION_DEFAULTS[mt]

  def get(key):
    if v.get(key) is not None:
      return v[key]
    alias = VISION_ALIASES.get(key)
    return v[alias] if alias and v.get(alias) is not None else dflt[key]

  rope = v.get("rope_parameters") or {}
  if rope.get("rope_type", "axial") != "axial":
    raise ConfigError(f"{where}: vision rope_type {rope['rope_type']!r} is not supported "
                      "(only 'axial')")
  if mt == "qwen2_vl":
    width, out, act = int(get("embed_dim")), int(get("hidden_size")), get("hidden_act")
    inter, extra = int(width * get("mlp_ratio")), {}
  elif mt in QWEN3_VL_TYPES:
    width, out, act = int(get("hidden_size")), int(get("out_hidden_size")), get("hidden_act")
    inter = int(get("intermediate_size"))
    extra = dict(num_position_embeddings=int(get("num_position_embeddings")),
                 deepstack_visual_indexes=tuple(get("deepstack_visual_indexes")))
  else:
    width, out, act = int(get("hidden_size")), int(get("out_hidden_size")), get("hidden_act")
    inter = int(get("intermediate_size"))
    extra = dict(window_size=int(get("window_size")),
                 fullatt_block_indexes=tuple(get("fullatt_block_indexes")),
                 tokens_per_second=int(get("tokens_per_second")))
  try:
    return QwenVisionConfig(
        model_type=mt, hidden_size=width, intermediate_size=inter, out_hidden_size=out,
        num_layers=int(get("depth")), num_heads=int(get("num_heads")),
        num_channels=int(get("in_channels")), patch_size=int(get("patch_size")),
        temporal_patch_size=int(get("temporal_patch_size")),
        spatial_merge_size=int(get("spatial_merge_size")), hidden_act=act,
        rope_theta=float(rope.get("rope_theta", 10000.0)), dtype=dtype, param_dtype=param_dtype,
        **extra)
  except ConfigError as e:
    raise ConfigError(f"{where}: {e}") from None


def qwen_vl_config_from_hf(d: dict, where: str = "config.json", dtype: str = "float32",
                           param_dtype: str = "float32") -> QwenVLConfig:
  """A `qwen2_vl` / `qwen2_5_vl` / `qwen3_vl` / `qwen3_vl_moe` config.json dict (flat or
  nested) -> `QwenVLConfig`."""
  mt = d.get("model_type")
  if mt not in QWEN_VL_TYPES:
    raise ConfigError(f"{where}: model_type {mt!r} is not one of {QWEN_VL_TYPES}")
  archs = d.get("architectures") or []
  arch = QWEN_VL_ARCHITECTURES[mt]
  if archs and not set(archs) & {arch, arch.replace("ForConditionalGeneration", "Model")}:
    raise ConfigError(f"{where}: architectures {archs} not supported for model_type '{mt}' "
                      f"(expected {arch})")
  nested = isinstance(d.get("text_config"), dict)
  text = dict(d["text_config"]) if nested else dict(d)
  twhere = f"{where}:text_config" if nested else where
  # the Qwen2 decoder (q/k/v bias, head_dim = hidden / heads); Qwen3-VL: Qwen3
  decoder = "qwen3" if mt in QWEN3_VL_TYPES else "qwen2"
  defaults = TEXT_DEFAULTS[decoder]
  if mt == "qwen3_vl_moe":
    defaults = {**defaults, **MOE_TEXT_DEFAULTS}
    local, named = text.get("num_local_experts"), text.get("num_experts")
    if local is not None and named is not None and local != named:
      raise ConfigError(f"{twhere}: num_experts {named} and num_local_experts {local} (the same "
                        "field in transformers) disagree")
    if local is not None:
      text["num_experts"] = local
  elif text.get("num_experts") or text.get("num_local_experts"):
    raise ConfigError(f"{twhere}: num_experts is set but model_type '{mt}' is dense (a "
                      "mixture-of-experts Qwen3-VL is 'qwen3_vl_moe')")
  for k, val in defaults.items():
    if text.get(k) is None:
      text[k] = val
  params = text.get("rope_parameters") or {}
  if "rope_theta" not in params and text.get("rope_theta") is None:
    text["rope_theta"] = DEFAULT_THETA[decoder]
  text["model_type"] = decoder
  if decoder == "qwen2":
    text["head_dim"] = int(_need(text, "hidden_size", twhere)) // int(
        _need(text, "num_attention_heads", twhere))
  elif "mrope_section" not in {**(text.get("rope_scaling") or {}), **params}:
    text["rope_parameters"] = {**params, "mrope_section": list(QWEN3_MROPE_SECTION)}
  if decoder == "qwen3" and nested:
    # transformers' Qwen3-VL(-MoE) ties on the top-level flag alone (default False); the MoE
    # text config's own flag defaults to True and is written out as such, but is not used
    text["tie_word_embeddings"] = bool(d.get("tie_word_embeddings", False))
  else:  # Qwen2-VL / 2.5-VL: a text-level True (pre-v5 saves) is forwarded to the top level
    text["tie_word_embeddings"] = bool(d.get("tie_word_embeddings")
                                       or text.get("tie_word_embeddings"))
  llm = llm_config_from_hf(text, twhere, mrope=True, dtype=dtype, param_dtype=param_dtype)
  if decoder == "qwen3":  # always interleaved (transformers ignores `mrope_interleaved`)
    llm = dataclasses.replace(llm, rope=dataclasses.replace(llm.rope, mrope_interleaved=True))
  vision = _vision_from_hf(dict(d.get("vision_config") or {}), mt, f"{where}:vision_config",
                           dtype, param_dtype)
  tokens = {k: int(d.get(k, val)) for k, val in TOKEN_DEFAULTS.items()}
  try:
    return QwenVLConfig(vision=vision, llm=llm, model_type=mt,
                        hf_json=json.dumps(d, sort_keys=True), **tokens)
  except ConfigError as e:
    raise ConfigError(f"{where}: {e}") from None


# ----------------------------------------------------------------------------- ours -> HF
def _vision_to_hf(c: QwenVisionConfig, base: dict) -> dict:
  v = dict(base)
  if c.model_type == "qwen2_vl":
    if c.intermediate_size % c.hidden_size:
      raise ConfigError(f"Qwen2-VL's config expresses the MLP width as embed_dim * mlp_ratio; "
                        f"{c.intermediate_size} is not a multiple of {c.hidden_size}")
    v.update(embed_dim=c.hidden_size, hidden_size=c.out_hidden_size,
             mlp_ratio=c.intermediate_size // c.hidden_size)
  elif c.qwen3:
    v.update(hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
             out_hidden_size=c.out_hidden_size,
             num_position_embeddings=c.num_position_embeddings,
             deepstack_visual_indexes=list(c.deepstack_visual_indexes))
  else:
    v.update(hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
             out_hidden_size=c.out_hidden_size, window_size=c.window_size,
             fullatt_block_indexes=list(c.fullatt_block_indexes),
             tokens_per_second=c.tokens_per_second)
  v.update(depth=c.num_layers, num_heads=c.num_heads, in_channels=c.num_channels,
           patch_size=c.patch_size, spatial_merge_size=c.spatial_merge_size,
           temporal_patch_size=c.temporal_patch_size, hidden_act=c.hidden_act)
  for ours, alias in VISION_ALIASES.items():  # keep the hub's duplicate names consistent
    if alias in v:
      v[alias] = v[ours]
  if "rope_parameters" in v or c.rope_theta != 10000.0:
    v["rope_parameters"] = {"rope_theta": c.rope_theta, "rope_type": "axial"}
  return v


def _text_to_hf(c: LLMConfig, base: dict, mt: str, nested: bool) -> dict:
  text = llm_config_to_hf(c)
  if c.model_type == "qwen2":
    text.pop("head_dim")  # Qwen2-VL's text model derives it (hidden_size / heads)
  rope = text.pop("rope_parameters")
  out = {**base, **text}
  if "num_local_experts" in base:  # transformers' name for num_experts: keep both consistent
    out["num_local_experts"] = c.num_experts
  if nested:
    out["model_type"] = f"{mt}_text"
  else:
    out.pop("model_type", None)
  if isinstance(base.get("rope_scaling"), dict):  # hub form: rope_scaling + rope_theta
    out["rope_scaling"] = {**base["rope_scaling"], "mrope_section": rope["mrope_section"]}
    out["rope_theta"] = rope["rope_theta"]
    out.pop("rope_parameters", None)
  else:
    out["rope_parameters"] = rope
    out.pop("rope_theta", None)
  return out


def qwen_vl_config_to_hf(cfg: QwenVLConfig, dtype: str) -> dict:
  """Our config -> HF `config.json` dict, in the form (flat / nested) it was read in."""
  base = json.loads(cfg.hf_json) if cfg.hf_json else {}
  nested = isinstance(base.get("text_config"), dict) or not base
  if nested:
    d = dict(base)
    d["text_config"] = _text_to_hf(cfg.llm, base.get("text_config", {}), cfg.model_type, True)
  else:
    d = {**_text_to_hf(cfg.llm, base, cfg.model_type, False)}
  vision = _vision_to_hf(cfg.vision, base.get("vision_config") or {})
  vision.setdefault("model_type", f"{cfg.model_type}_vision")
  d.update(vision_config=vision, model_type=cfg.model_type,
           architectures=[QWEN_VL_ARCHITECTURES[cfg.model_type]],
           tie_word_embeddings=cfg.llm.tie_word_embeddings, image_token_id=cfg.image_token_id,
           video_token_id=cfg.video_token_id, vision_start_token_id=cfg.vision_start_token_id,
           vision_end_token_id=cfg.vision_end_token_id)
  d.pop("torch_dtype", None)
  d["dtype"] = dtype
  return d


def qwen_vl_config_from_dict(d: dict, llm: LLMConfig, build: Any) -> QwenVLConfig:
  """Our plain-JSON form (`models.config.config_to_dict`) back; `llm` already built."""
  d = dict(d, llm=llm)
  d["vision"] = build(QwenVisionConfig, d["vision"], "vision")
  return build(QwenVLConfig, d, "config")
