"""Hugging Face `CLIPModel` directories (config.json + safetensors) -> `(CLIP module, params)`.

Key layout (transformers 4.x and 5.x alike; weight = kernel^T for linear layers):
  vision_model.*                             -> vision/* (the LLaVA vision-tower rules of hf.py)
  text_model.embeddings.{token,position}_embedding.weight -> text/embed/{token,position}_embedding
  text_model.encoder.layers.{i}.{self_attn.{q,k,v,out}_proj, layer_norm{1,2}, mlp.fc{1,2}}
                                             -> text/layers/{attn/*, norm{1,2}, mlp/fc{1,2}}
  text_model.final_layer_norm                -> text/final_norm
  visual_projection.weight, text_projection.weight -> {visual,text}_projection/kernel
  logit_scale                                -> logit_scale ()
Buffers some older checkpoints carry (`*.position_ids`) are ignored. Any other missing or
unexpected tensor, or a shape the config does not imply, raises `CheckpointError` naming the
tensor and its file.
"""
from __future__ import annotations

import json
import os

import numpy as np

from mllm_tune.checkpoints.hf import (TO_HF, TO_OURS, Rule, _assemble, _lin, _norm,
                                      open_checkpoint, read_config_json, vision_rules)
from mllm_tune.checkpoints.safetensors_io import FLOAT_DTYPES, CheckpointError
from mllm_tune.models.clip import CLIP, CLIPConfig, CLIPTextConfig, clip_param_shapes
from mllm_tune.models.config import ConfigError, vision_config_from_hf

IGNORED_SUFFIXES = ("position_ids",)  # non-persistent buffers saved by old transformers


def text_config_from_hf(d: dict, where: str, dtype: str = "float32",
                        param_dtype: str = "float32") -> CLIPTextConfig:
  """Parse a `clip_text_model` config dict (HF defaults for absent optional fields)."""
  mt = d.get("model_type", "clip_text_model")
  if mt != "clip_text_model":
    raise ConfigError(f"{where}: text model_type '{mt}' is not supported (only clip_text_model)")

  def need(key):
    if d.get(key) is None:
      raise ConfigError(f"{where}: required field '{key}' is missing")
    return d[key]

  eos = d.get("eos_token_id", 49407)
  if not isinstance(eos, int):
    raise ConfigError(f"{where}: eos_token_id={eos!r}: only a single int is supported")
  return CLIPTextConfig(
      vocab_size=int(need("vocab_size")), hidden_size=int(need("hidden_size")),
      intermediate_size=int(need("intermediate_size")),
      num_layers=int(need("num_hidden_layers")), num_heads=int(need("num_attention_heads")),
      max_position_embeddings=int(d.get("max_position_embeddings", 77)),
      layer_norm_eps=float(d.get("layer_norm_eps") or 1e-5),
      hidden_act=d.get("hidden_act", "quick_gelu"), eos_token_id=eos, dtype=dtype,
      param_dtype=param_dtype)


def clip_config_from_hf(d: dict, where: str = "config.json", dtype: str = "float32",
                        param_dtype: str = "float32") -> CLIPConfig:
  """Parse a full `CLIPModel` config.json dict; errors name the file and the field."""
  if d.get("model_type") != "clip":
    raise ConfigError(f"{where}: model_type {d.get('model_type')!r} is not 'clip' (a "
                      f"CLIPModel checkpoint; architectures {d.get('architectures')})")
  for key in ("text_config", "vision_config"):
    if not isinstance(d.get(key), dict):
      raise ConfigError(f"{where}: required field '{key}' is missing")
  vis = vision_config_from_hf(d["vision_config"], f"{where}:vision_config", dtype=dtype,
                              param_dtype=param_dtype)
  if not vis.is_clip:
    raise ConfigError(f"{where}:vision_config: model_type '{vis.model_type}' is not "
                      "clip_vision_model")
  text = text_config_from_hf(d["text_config"], f"{where}:text_config", dtype, param_dtype)
  return CLIPConfig(vision=vis, text=text, projection_dim=int(d.get("projection_dim", 512)),
                    logit_scale_init=float(d.get("logit_scale_init_value", 2.6592)),
                    hf_json=json.dumps(d, sort_keys=True))


def text_rules(c: CLIPTextConfig, prefix: str = "text_model.") -> list[Rule]:
  p, lp, s = prefix, ("text", "layers"), True
  rules = [Rule(f"{p}embeddings.token_embedding.weight", ("text", "embed", "token_embedding")),
           Rule(f"{p}embeddings.position_embedding.weight",
                ("text", "embed", "position_embedding"))]
  enc = f"{p}encoder.layers.{{i}}."
  for n in ("q", "k", "v", "out"):
    rules += _lin(f"{enc}self_attn.{n}_proj", lp + ("attn", f"{n}_proj"), True, s)
  for n in ("1", "2"):
    rules += _norm(f"{enc}layer_norm{n}", lp + (f"norm{n}",), s, True)
    rules += _lin(f"{enc}mlp.fc{n}", lp + ("mlp", f"fc{n}"), True, s)
  rules += _norm(f"{p}final_layer_norm", ("text", "final_norm"), False, True)
  return rules


def clip_rules(cfg: CLIPConfig) -> list[Rule]:
  """Every tensor of a `CLIPModel` checkpoint and where it goes."""
  return (vision_rules(cfg.vision, "vision_model.") + text_rules(cfg.text)
          + _lin("visual_projection", ("visual_projection",), False, False)
          + _lin("text_projection", ("text_projection",), False, False)
          + [Rule("logit_scale", ("logit_scale",))])


def _num_layers(cfg: CLIPConfig, rule: Rule) -> int:
  return cfg.vision.num_layers if rule.path[0] == "vision" else cfg.text.num_layers


def _names(cfg: CLIPConfig, rule: Rule) -> list[str]:
  if not rule.stacked:
    return [rule.hf]
  return [rule.hf.format(i=i) for i in range(_num_layers(cfg, rule))]


def check_keys(path: str, cfg: CLIPConfig, tensors: dict) -> None:
  """Raise `CheckpointError` listing missing and unexpected tensors (with their files)."""
  want = {n for r in clip_rules(cfg) for n in _names(cfg, r)}
  have = {k for k in tensors if not k.endswith(IGNORED_SUFFIXES)}
  missing, unexpected = sorted(want - have), sorted(have - want)
  if not missing and not unexpected:
    return
  msg = f"{path}: the checkpoint's tensors do not match its config.json (CLIPModel)"
  if missing:
    msg += f"; {len(missing)} missing, e.g. {missing[:4]}"
  if unexpected:
    where = [f"{k} (in {os.path.basename(tensors[k].path)})" for k in unexpected[:4]]
    msg += f"; {len(unexpected)} unexpected, e.g. {where}"
  raise CheckpointError(msg)


def read_clip_config(path: str, dtype: str = "float32",
                     param_dtype: str = "float32") -> CLIPConfig:
  d, cfg_file = read_config_json(path)
  return clip_config_from_hf(d, cfg_file, dtype, param_dtype)


def load_clip(path: str, dtype: str = "float32", param_dtype: str = "float32"
              ) -> tuple[CLIP, dict]:
  """HF `CLIPModel` directory (single or sharded safetensors) -> `(CLIP(cfg), params)`."""
  cfg = read_clip_config(path, dtype, param_dtype)
  tensors = open_checkpoint(path)
  check_keys(path, cfg, tensors)
  model = CLIP(cfg)
  shapes = clip_param_shapes(model)
  params: dict = {}
  for rule in clip_rules(cfg):
    leaf = shapes
    for k in rule.path:
      leaf = leaf[k]
    per_layer = tuple(leaf.shape[1:]) if rule.stacked else tuple(leaf.shape)
    want = TO_HF[rule.kind](np.empty(per_layer, np.bool_)).shape
    views = []
    for name in _names(cfg, rule):
      f = tensors[name]
      shape, dt = f.info(name)
      where = f"{os.path.basename(f.path)}: tensor '{name}'"
      if dt not in FLOAT_DTYPES:
        raise CheckpointError(f"{where} has dtype {dt}; a floating dtype ({FLOAT_DTYPES}) "
                              "was expected")
      if tuple(shape) != want:
        raise CheckpointError(f"{where} has shape {list(shape)} but config.json implies "
                              f"{list(want)}")
      views.append(TO_OURS[rule.kind](f.get(name)))
    node = params
    for k in rule.path[:-1]:
      node = node.setdefault(k, {})
    node[rule.path[-1]] = _assemble(views, rule.stacked, leaf.shape, leaf.dtype, None)
  return model, params
