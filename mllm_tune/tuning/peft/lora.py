"""PEFT `LORA` export/import for LoRA, rsLoRA, DoRA, PiSSA (as plain LoRA) and LoRASculpt."""
from __future__ import annotations

import jax
import numpy as np

from mllm_tune.models.adapters import DORA_M, LORA_A, LORA_B
from mllm_tune.tuning.peft import format as peft_io
from mllm_tune import pytree
from mllm_tune.tuning.api import MethodError
from mllm_tune.tuning.reparam.lora import (LoRA, adapter_path, get_leaf, pissa_to_lora,
                                           resolve_targets)

LORA_SUFFIXES = ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector")


def export_lora(method: LoRA, model, variables: dict):
  if method.name == "pissa":  # exported as plain LoRA on the original base (docs/methods.md §4.4 b)
    method, variables = pissa_to_lora(method, variables)
  cfg = model.config
  adapters = variables["adapters"]
  tensors, names = {}, []
  for path, flags in sorted(resolve_targets(variables["params"], method.targets).items()):
    a = np.asarray(get_leaf(adapters, adapter_path(path, LORA_A)), np.float32)
    b = np.asarray(get_leaf(adapters, adapter_path(path, LORA_B)), np.float32)
    m = (np.asarray(get_leaf(adapters, adapter_path(path, DORA_M)), np.float32)
         if method.use_dora else None)
    layers = list(np.flatnonzero(flags)) if flags.ndim else [None]
    for i in layers:
      sl = (lambda x: x[i]) if i is not None else (lambda x: x)
      name = peft_io.hf_module_name(cfg, path, i)
      names.append(name)
      key = f"{peft_io.PREFIX}{name}"
      tensors[f"{key}.lora_A.weight"] = sl(a).T
      tensors[f"{key}.lora_B.weight"] = sl(b).T
      if m is not None:
        tensors[f"{key}.lora_magnitude_vector"] = sl(m)
  config = {"peft_type": "LORA", "r": method.rank, "lora_alpha": method.alpha,
            "lora_dropout": method.dropout, "use_rslora": method.use_rslora,
            "use_dora": method.use_dora, "init_lora_weights": True, "bias": "none",
            "fan_in_fan_out": False, "rank_pattern": {}, "alpha_pattern": {},
            "modules_to_save": None, "layers_to_transform": None,
            "target_modules": peft_io.targets_regex(names)}
  return config, tensors


def import_lora(config: dict, tensors: dict, model, params: dict, where: str):
  for key in ("rank_pattern", "alpha_pattern"):
    if config.get(key):
      raise MethodError(f"{where}: PEFT '{key}' is not supported yet")
  if config.get("bias", "none") != "none" or config.get("modules_to_save"):
    raise MethodError(f"{where}: adapters with bias training or modules_to_save are not "
                      "supported (they are not pure LoRA)")
  lookup = peft_io.module_lookup(model.config)
  per_module: dict[str, dict] = {}
  for key, arr in tensors.items():
    module, suffix = peft_io.split_key(key, LORA_SUFFIXES, where)
    if module not in lookup:
      raise MethodError(f"{where}: tensor '{key}' targets module '{module}', which this model "
                        "does not have")
    path, layer = lookup[module]
    per_module.setdefault(path, {}).setdefault(suffix, {})[layer] = arr
  r = int(config["r"])
  method = LoRA(rank=r, alpha=float(config.get("lora_alpha", r)),
                dropout=float(config.get("lora_dropout", 0.0)),
                use_rslora=bool(config.get("use_rslora", False)),
                use_dora=bool(config.get("use_dora", False)),
                targets=tuple(sorted(peft_io.logical_target(p, i)
                                     for p, d in per_module.items()
                                     for i in d["lora_A.weight"])))
  adapters = pytree.flatten(method.init(jax.random.key(0), params))
  for path, parts in per_module.items():
    k_shape = tuple(np.shape(get_leaf(params, path)))
    d_in, d_out = k_shape[-2:]
    a = {i: v.T for i, v in parts["lora_A.weight"].items()}
    b = {i: v.T for i, v in parts.get("lora_B.weight", {}).items()}
    if set(b) != set(a):
      raise MethodError(f"{where}: module {path} has lora_A for layers {sorted(a)} but "
                        f"lora_B for {sorted(b)}")
    for i in a:
      name = f"{peft_io.PREFIX}{peft_io.hf_module_name(model.config, path, i)}"
      peft_io.check_shape(a[i], (d_in, r), f"{name}.lora_A.weight (transposed)", where)
      peft_io.check_shape(b[i], (r, d_out), f"{name}.lora_B.weight (transposed)", where)
    adapters[adapter_path(path, LORA_A)] = peft_io.to_stacked(a, k_shape, (d_in, r))
    adapters[adapter_path(path, LORA_B)] = peft_io.to_stacked(b, k_shape, (r, d_out))
    if method.use_dora:
      m = parts.get("lora_magnitude_vector", {})
      for i in a:
        peft_io.check_shape(m[i], (d_out,), f"{path} layer {i} lora_magnitude_vector", where)
      adapters[adapter_path(path, DORA_M)] = peft_io.to_stacked(m, k_shape, (d_out,))
  return method, {"params": params, "adapters": pytree.unflatten(adapters)}
