"""PEFT adapters in and out: `adapter_config.json` + `adapter_model.safetensors` (docs/methods.md
§4.7).

Keys are `base_model.model.<HF module path>.<peft tensor>`, where the module path is the module's
name inside the transformers model (`model.language_model.layers.3.self_attn.q_proj`). Export
writes contiguous float32 tensors with metadata `{"format": "pt"}` and a `target_modules` regex
that peft full-matches on exactly the modules we adapted. Import accepts module paths of every
key layout of the model's family (LLaVA, Qwen2-VL: `checkpoints.hf.key_layouts`). Per-method
tensor mappings live beside this module (`lora.py`, `vera.py`, `ln_tuning.py`, `additive.py`);
the tables and entry points are in `tuning/peft/__init__.py`.
"""
from __future__ import annotations

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np

from mllm_tune.checkpoints.hf import checkpoint_rules, key_layouts, memory_layout
from mllm_tune.checkpoints.safetensors_io import CheckpointError, SafetensorsFile, write_safetensors
from mllm_tune import pytree
from mllm_tune.tuning.api import MethodError

PREFIX = "base_model.model."
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


def _layouts(cfg) -> list[str | None]:
  table = key_layouts(cfg)
  return [None] if table is None else list(table)


def _module_patterns(cfg, layout: str | None) -> dict[str, str]:
  """{our kernel storage path: HF module name pattern (with {i} for stacked)}; a
  mixture-of-experts stack maps to its parameter's name (`...mlp.experts.gate_up_proj`), which
  is what peft's `target_parameters` name; the token embedding to its module (`embed_tokens`)."""
  out = {}
  for rule in checkpoint_rules(cfg, layout):
    if ((rule.path[-1] == "kernel" or "/".join(rule.path) == pytree.TOKEN_EMBEDDING)
        and rule.hf.endswith(".weight")):
      out["/".join(rule.path)] = rule.hf[:-len(".weight")]
    elif pytree.is_expert_path("/".join(rule.path)):
      out["/".join(rule.path)] = rule.hf
  return out


def hf_module_name(cfg, kernel_path: str, layer: int | None) -> str:
  if kernel_path.endswith("mlp/router/kernel"):
    raise MethodError(f"{kernel_path}: the mixture-of-experts router is not an nn.Linear in "
                      "transformers (Qwen3VLMoeTextTopKRouter), so PEFT cannot load an adapter "
                      "on it; merge the method into the weights (save_pretrained) or keep our "
                      "native adapter checkpoint")
  layout = memory_layout(cfg)
  pattern = _module_patterns(cfg, layout)[kernel_path]
  return pattern.format(i=layer) if layer is not None else pattern


def module_lookup(cfg) -> dict[str, tuple[str, int | None]]:
  """{HF module name in any supported layout: (our kernel path, layer)}."""
  layouts = _layouts(cfg)
  out = {}
  for layout in layouts:
    for path, pattern in _module_patterns(cfg, layout).items():
      if "{i}" in pattern:
        n = cfg.vision.num_layers if path.startswith("vision/") else cfg.llm.num_layers
        out.update({pattern.format(i=i): (path, i) for i in range(n)})
      else:
        out[pattern] = (path, None)
  return out


def tensor_rules(cfg, layout: str | None):
  """[(HF tensor name, our storage path, layer or None, kind)] for every tensor of `cfg`."""
  out = []
  for rule in checkpoint_rules(cfg, layout):
    path = "/".join(rule.path)
    if rule.stacked:
      n = cfg.vision.num_layers if path.startswith("vision/") else cfg.llm.num_layers
      out += [(rule.hf.format(i=i), path, i, rule.kind) for i in range(n)]
    else:
      out.append((rule.hf, path, None, rule.kind))
  return out


def export_layout(cfg) -> str | None:
  """The key layout of module names inside the transformers 5 model (what peft writes)."""
  return memory_layout(cfg)


def tensor_lookup(cfg) -> dict[str, tuple[str, int | None, str]]:
  """{HF tensor name in any supported layout: (our storage path, layer, kind)}."""
  layouts = _layouts(cfg)
  out = {}
  for layout in layouts:
    out.update({hf: (path, layer, kind) for hf, path, layer, kind in tensor_rules(cfg, layout)})
  return out


def unknown_module(cfg, key: str, module: str, where: str) -> Exception:
  """The error for a tensor whose module this model lacks (a tied LM head said so)."""
  if module.rsplit(".", 1)[-1] == "lm_head" and cfg.llm.tie_word_embeddings:
    return MethodError(f"{where}: tensor '{key}' adapts the LM head '{module}', but this model "
                       "ties its LM head to the input embeddings (tie_word_embeddings=true), so "
                       "there is no separate lm_head weight to adapt; use an untied base or "
                       "leave lm_head out of target_modules")
  return MethodError(f"{where}: tensor '{key}' targets module '{module}', which this model does "
                     "not have")


def targets_regex(names: list[str]) -> str:
  return "(" + "|".join(re.escape(n) for n in sorted(names)) + ")"


def write_adapter(out_dir: str, config: dict, tensors: dict[str, np.ndarray]) -> None:
  os.makedirs(out_dir, exist_ok=True)
  specs = [(k, tuple(v.shape), np.dtype(np.float32),
            (lambda v=v: np.ascontiguousarray(v, np.float32))) for k, v in sorted(tensors.items())]
  write_safetensors(os.path.join(out_dir, WEIGHTS_FILE), specs, {"format": "pt"})
  with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
    json.dump(config, f, indent=2, sort_keys=True)


def read_adapter(path: str) -> tuple[dict, dict[str, np.ndarray]]:
  cfg_file = os.path.join(path, CONFIG_FILE)
  if not os.path.isfile(cfg_file):
    raise CheckpointError(f"{path}: no {CONFIG_FILE} (not a PEFT adapter directory)")
  try:
    with open(cfg_file) as f:
      config = json.load(f)
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{cfg_file}: malformed JSON at line {e.lineno}: {e.msg}") from e
  weights = os.path.join(path, WEIGHTS_FILE)
  if not os.path.isfile(weights):
    raise CheckpointError(f"{path}: no {WEIGHTS_FILE}")
  f = SafetensorsFile(weights)
  return config, {k: np.asarray(f.get(k), np.float32) for k in f.keys()}


def split_key(key: str, suffixes: tuple[str, ...], where: str) -> tuple[str, str]:
  """`base_model.model.<module>.<suffix>` -> (module, suffix)."""
  if not key.startswith(PREFIX):
    raise CheckpointError(f"{where}: tensor '{key}' does not start with '{PREFIX}'")
  for s in suffixes:
    if key.endswith("." + s):
      return key[len(PREFIX):-len(s) - 1], s
  raise CheckpointError(f"{where}: tensor '{key}' is not one of {suffixes}")


def check_shape(arr: np.ndarray, want: tuple[int, ...], key: str, where: str) -> None:
  if tuple(arr.shape) != tuple(want):
    raise CheckpointError(f"{where}: tensor '{key}' has shape {list(arr.shape)} but the base "
                          f"model implies {list(want)}")


def to_stacked(values: dict[int | None, np.ndarray], kernel_shape, per_layer_shape) -> jax.Array:
  """Per-layer arrays (missing layers = 0) -> one leaf shaped like the adapter's layer."""
  if len(kernel_shape) == 2:
    return jnp.asarray(values[None])
  out = np.zeros((kernel_shape[0], *per_layer_shape), np.float32)
  for i, v in values.items():
    out[i] = v
  return jnp.asarray(out)


def layer_flags(layers: set, kernel_shape) -> np.ndarray:
  if len(kernel_shape) == 2:
    return np.asarray(True)
  return np.isin(np.arange(kernel_shape[0]), sorted(layers))


def logical_target(path: str, layer: int | None) -> str:
  """The LoRA target regex of one kernel (its module path) or expert stack (its own path)."""
  logical = pytree.logical_path(path, layer)
  if not pytree.is_expert_path(path):
    logical = logical.rsplit("/", 1)[0]
  return re.escape(logical)
