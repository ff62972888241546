"""Hugging Face checkpoint key layouts and tensor rules: which HF tensor is which of our
parameters, under which key prefix, with which layout transform (`TO_OURS` / `TO_HF`), for
every supported family (LLaVA, Qwen2-VL / 2.5-VL / 3-VL, bare LLMs). `checkpoints.hf` reads and
writes with them (and re-exports them)."""
from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np

from mllm_tune.models.config import CausalLMConfig, LlavaConfig, QwenVLConfig

# Key layouts of LlavaForConditionalGeneration checkpoints seen in the wild:
#   legacy:   llava-hf checkpoints written by transformers < 4.52
#   v5:       transformers >= 4.52 module names (`model.language_model.*`, `lm_head`)
#   v5_saved: what transformers 5.x `save_pretrained` writes (reverse conversion mapping, and
#             CLIPVisionModel/SiglipVisionModel without their `vision_model.` prefix)
#   v5_flat:  transformers 5.x in-memory names
# A checkpoint is read in whichever layout matches its keys exactly and written back in the same.
LLAVA_LAYOUTS = {
    "legacy": ("language_model.model.", "language_model.lm_head", "vision_tower.vision_model.",
               "multi_modal_projector."),
    "v5": ("model.language_model.", "lm_head", "model.vision_tower.vision_model.",
           "model.multi_modal_projector."),
    "v5_saved": ("language_model.model.", "language_model.lm_head", "vision_tower.",
                 "multi_modal_projector."),
    "v5_flat": ("model.language_model.", "lm_head", "model.vision_tower.",
                "model.multi_modal_projector."),
}
DEFAULT_LLAVA_LAYOUT = "v5"
# Qwen2-VL / Qwen2.5-VL (LLM prefix, LM head, vision prefix; the merger is `<vision>merger.`):
#   hub: the hub's names, which transformers 5 `save_pretrained` also writes
#   v5:  transformers 5 in-memory names (`conversion_mapping.py`, Qwen2VLForConditionalGeneration)
QWEN_VL_LAYOUTS = {
    "hub": ("model.", "lm_head", "visual."),
    "v5": ("model.language_model.", "lm_head", "model.visual."),
}
DEFAULT_QWEN_VL_LAYOUT = "hub"
QWEN3_VL_LAYOUTS = {"v5": QWEN_VL_LAYOUTS["v5"]}  # Qwen3-VL's hub files and transformers 5
# Qwen3-VL-MoE: the same names, and the expert tensors in two orientations:
#   v5:          what transformers 5 holds and writes, gate_up_proj (E, 2F, D), down_proj (E, D, F)
#   hub_experts: the hub's files (transformers 4.57's layout), (E, D, 2F) and (E, F, D)
QWEN3_VL_MOE_LAYOUTS = {"v5": QWEN_VL_LAYOUTS["v5"], "hub_experts": QWEN_VL_LAYOUTS["v5"]}
# module names inside the transformers 5 model (what peft adapter files name)
MEMORY_LAYOUTS = {LlavaConfig: "v5_flat", QwenVLConfig: "v5"}


class _Transforms(dict):
  """kind -> transform; parameterised kinds `conv3d:CxTxPxP` are built on first use."""

  def __init__(self, table: dict, conv3d: Callable):
    super().__init__(table)
    self._conv3d = conv3d

  def __missing__(self, kind: str):
    name, _, dims = kind.partition(":")
    if name != "conv3d" or not dims:
      raise KeyError(kind)
    fn = self[kind] = self._conv3d(tuple(int(x) for x in dims.split("x")))
    return fn


def conv3d_kind(channels: int, temporal: int, patch: int) -> str:
  """The transform kind of a Conv3d patch embedding whose kernel equals its stride:
  HF (D, C, T, p, p) <-> ours (C*T*p*p, D)."""
  return f"conv3d:{channels}x{temporal}x{patch}x{patch}"


# Layout transforms, HF tensor -> ours (and back).
TO_OURS = _Transforms({"copy": lambda x: x, "linear": lambda x: x.T,
                       "experts_t": lambda x: x.swapaxes(-1, -2),
                       "patch": lambda x: x.transpose(2, 3, 1, 0)},  # (D, C, P, P) -> (P, P, C, D)
                      lambda dims: lambda x: x.reshape(x.shape[0], -1).T)
TO_HF = _Transforms({"copy": lambda x: x, "linear": lambda x: x.T,
                     "experts_t": lambda x: x.swapaxes(-1, -2),
                     "patch": lambda x: x.transpose(3, 2, 0, 1)},
                    lambda dims: lambda x: x.T.reshape((x.shape[1],) + dims))


class Rule(NamedTuple):
  """One HF tensor family: `hf` may hold `{i}` (layer index) when `stacked`."""
  hf: str
  path: tuple[str, ...]
  kind: str = "copy"
  stacked: bool = False


def _lin(hf: str, path: tuple, bias: bool, stacked: bool) -> list[Rule]:
  out = [Rule(f"{hf}.weight", path + ("kernel",), "linear", stacked)]
  if bias:
    out.append(Rule(f"{hf}.bias", path + ("bias",), "copy", stacked))
  return out


def _norm(hf: str, path: tuple, stacked: bool, bias: bool) -> list[Rule]:
  out = [Rule(f"{hf}.weight", path + ("scale",), "copy", stacked)]
  if bias:
    out.append(Rule(f"{hf}.bias", path + ("bias",), "copy", stacked))
  return out


def llm_rules(c, prefix: str, head: str = "lm_head", experts: str = "experts_t") -> list[Rule]:
  """Rules for the decoder under `prefix` (e.g. `model.language_model.`), LM head at `head`;
  `experts` is the transform kind of mixture-of-experts tensors ("experts_t": transformers 5's
  orientation, "copy": the hub's, which is ours)."""
  p, lp, s = prefix, ("llm", "layers"), True
  rules = [Rule(f"{p}embed_tokens.weight", ("llm", "embed", "embedding"))]
  for n in "qkvo":
    rules += _lin(f"{p}layers.{{i}}.self_attn.{n}_proj", lp + ("attn", f"{n}_proj"),
                  c.o_bias if n == "o" else c.qkv_bias, s)
  if c.num_experts:
    rules += _lin(f"{p}layers.{{i}}.mlp.gate", lp + ("mlp", "router"), False, s)
    rules += [Rule(f"{p}layers.{{i}}.mlp.experts.{n}_proj", lp + ("mlp", f"experts_{n}"),
                   experts, s) for n in ("gate_up", "down")]
  else:
    for n in ("gate", "up", "down"):
      rules += _lin(f"{p}layers.{{i}}.mlp.{n}_proj", lp + ("mlp", f"{n}_proj"), c.mlp_bias, s)
  if c.qk_norm:  # Qwen3
    for n in "qk":
      rules += _norm(f"{p}layers.{{i}}.self_attn.{n}_norm", lp + ("attn", f"{n}_norm"), s, False)
  rules += _norm(f"{p}layers.{{i}}.input_layernorm", lp + ("input_norm",), s, False)
  rules += _norm(f"{p}layers.{{i}}.post_attention_layernorm", lp + ("post_attn_norm",), s, False)
  rules += _norm(f"{p}norm", ("llm", "final_norm"), False, False)
  if not c.tie_word_embeddings:
    rules += _lin(head, ("llm", "lm_head"), False, False)
  return rules


def vision_rules(c, prefix: str) -> list[Rule]:
  p, vp, s = prefix, ("vision", "layers"), True
  e = f"{p}embeddings."
  rules = [Rule(f"{e}patch_embedding.weight", ("vision", "embed", "patch_kernel"), "patch"),
           Rule(f"{e}position_embedding.weight", ("vision", "embed", "position_embedding"))]
  if c.is_clip:
    rules += [Rule(f"{e}class_embedding", ("vision", "embed", "class_embedding"))]
    rules += _norm(f"{p}pre_layrnorm", ("vision", "pre_norm"), False, True)
  else:
    rules += [Rule(f"{e}patch_embedding.bias", ("vision", "embed", "patch_bias"))]
  enc = f"{p}encoder.layers.{{i}}."
  for n in ("q", "k", "v", "out"):
    rules += _lin(f"{enc}self_attn.{n}_proj", vp + ("attn", f"{n}_proj"), True, s)
  for n in ("1", "2"):
    rules += _norm(f"{enc}layer_norm{n}", vp + (f"norm{n}",), s, True)
    rules += _lin(f"{enc}mlp.fc{n}", vp + ("mlp", f"fc{n}"), True, s)
  rules += _norm(f"{p}post_layernorm", ("vision", "post_norm"), False, True)
  if c.use_head:
    h, hp = f"{p}head.", ("vision", "head")
    rules += [Rule(f"{h}probe", hp + ("probe",)),
              Rule(f"{h}attention.in_proj_weight", hp + ("in_proj_kernel",), "linear"),
              Rule(f"{h}attention.in_proj_bias", hp + ("in_proj_bias",))]
    rules += _lin(f"{h}attention.out_proj", hp + ("out_proj",), True, False)
    rules += _norm(f"{h}layernorm", hp + ("layernorm",), False, True)
    rules += _lin(f"{h}mlp.fc1", hp + ("mlp", "fc1"), True, False)
    rules += _lin(f"{h}mlp.fc2", hp + ("mlp", "fc2"), True, False)
  return rules


def qwen_vision_rules(c, prefix: str) -> list[Rule]:
  """The Qwen2-VL / 2.5-VL / 3-VL tower under `vision/` and its merger(s) under `projector/`."""
  vp, s = ("vision", "layers"), True
  rules = [Rule(f"{prefix}patch_embed.proj.weight", ("vision", "patch_embed", "kernel"),
                conv3d_kind(c.num_channels, c.temporal_patch_size, c.patch_size))]
  if c.qwen3:
    rules += [Rule(f"{prefix}patch_embed.proj.bias", ("vision", "patch_embed", "bias")),
              Rule(f"{prefix}pos_embed.weight", ("vision", "pos_embed"))]
  blk = f"{prefix}blocks.{{i}}."
  for n in ("1", "2"):
    rules += _norm(f"{blk}norm{n}", vp + (f"norm{n}",), s, not c.windowed)
  rules += _lin(f"{blk}attn.qkv", vp + ("attn", "qkv"), True, s)
  rules += _lin(f"{blk}attn.proj", vp + ("attn", "proj"), True, s)
  for n in ("gate_proj", "up_proj", "down_proj") if c.windowed else ("fc1", "fc2"):
    rules += _lin(f"{blk}mlp.{'linear_' if c.qwen3 else ''}{n}", vp + ("mlp", n), True, s)
  mergers = [(f"{prefix}merger.", ("projector",))] + [
      (f"{prefix}deepstack_merger_list.{i}.", ("projector", f"deepstack_{i}"))
      for i in range(len(c.deepstack_visual_indexes))]
  for m, mp in mergers:  # Qwen3-VL: norm, linear_fc1, linear_fc2; else ln_q, mlp.0, mlp.2
    names = ("norm", "linear_fc1", "linear_fc2") if c.qwen3 else ("ln_q", "mlp.0", "mlp.2")
    rules += _norm(f"{m}{names[0]}", mp + ("ln_q",), False, not c.windowed)
    rules += _lin(f"{m}{names[1]}", mp + ("linear_1",), True, False)
    rules += _lin(f"{m}{names[2]}", mp + ("linear_2",), True, False)
  return rules


def key_layouts(cfg) -> dict | None:
  """The key layouts a config's checkpoints come in (None: a bare LLM's single layout)."""
  if isinstance(cfg, QwenVLConfig):
    if cfg.llm.num_experts:
      return QWEN3_VL_MOE_LAYOUTS
    return QWEN3_VL_LAYOUTS if cfg.vision.qwen3 else QWEN_VL_LAYOUTS
  return LLAVA_LAYOUTS if isinstance(cfg, LlavaConfig) else None


def default_layout(cfg) -> str:
  """The key layout written when none was read: 'v5' (LLaVA, Qwen3-VL), 'hub' (Qwen2-VL)."""
  if isinstance(cfg, QwenVLConfig):
    return "v5" if cfg.vision.qwen3 else DEFAULT_QWEN_VL_LAYOUT
  return DEFAULT_LLAVA_LAYOUT


def memory_layout(cfg) -> str | None:
  """The layout of module names inside the transformers 5 model (peft files use them)."""
  return MEMORY_LAYOUTS.get(type(cfg))


def checkpoint_rules(cfg, layout: str | None = None) -> list[Rule]:
  """All tensor rules of a config; `layout` picks the key layout (`key_layouts`)."""
  if isinstance(cfg, CausalLMConfig):
    return llm_rules(cfg.llm, "model.")
  if isinstance(cfg, QwenVLConfig):
    layout = layout or default_layout(cfg)
    llm_p, head, vis_p = key_layouts(cfg)[layout]
    experts = "copy" if layout == "hub_experts" else "experts_t"
    return llm_rules(cfg.llm, llm_p, head, experts) + qwen_vision_rules(cfg.vision, vis_p)
  llm_p, head, vis_p, proj_p = LLAVA_LAYOUTS[layout or DEFAULT_LLAVA_LAYOUT]
  rules = llm_rules(cfg.llm, llm_p, head)
  rules += vision_rules(cfg.vision, vis_p)
  for n in ("1", "2") if cfg.projector_type == "mlp2x_gelu" else ("1",):
    rules += _lin(f"{proj_p}linear_{n}", ("projector", f"linear_{n}"), cfg.projector_bias, False)
  if cfg.anyres:  # LLaVA-NeXT / OneVision: beside the projector, `model.` in the v5 layouts
    rules.append(Rule(f"{proj_p[:-len('multi_modal_projector.')]}image_newline",
                      ("image_newline",)))
  return rules


def layout_shapes(cfg, layout: str | None) -> dict[str, tuple[int, ...]]:
  """HF tensor name -> shape for the tensors whose orientation tells layouts with the same
  names apart (layer 0's mixture-of-experts tensors; {} elsewhere)."""
  c = cfg.llm
  if not c.num_experts or not isinstance(cfg, QwenVLConfig):
    return {}
  e, d, f = c.num_experts, c.hidden_size, c.moe_intermediate_size
  ours = {"gate_up": (e, d, 2 * f), "down": (e, f, d)}
  out = {}
  for r in checkpoint_rules(cfg, layout):
    name = r.path[-1].removeprefix("experts_")
    if r.path[-2:-1] == ("mlp",) and name in ours:
      out[r.hf.format(i=0)] = TO_HF[r.kind](np.empty(ours[name], np.bool_)).shape
  return out


def expected_keys(cfg, layout: str | None) -> set[str]:
  return {k for r in checkpoint_rules(cfg, layout) for k in _expand(r, _layers_of(cfg, r))}


def _expand(rule: Rule, num_layers: int) -> list[str]:
  return [rule.hf.format(i=i) for i in range(num_layers)] if rule.stacked else [rule.hf]


def _layers_of(cfg, rule: Rule) -> int:
  return cfg.vision.num_layers if rule.path[0] == "vision" else cfg.llm.num_layers
