"""PEFT `LN_TUNING` export/import for `ln_tuning` (docs/methods.md §2.3, 4.7).

peft's LN tuning replaces each target module by a trainable copy, saved as
`base_model.model.<module>.ln_tuning_layers.<param>` (a norm's `weight`; a Linear's `weight` and
`bias`). Export targets exactly the modules whose params we trained (the projector as its two
Linears), with a `target_modules` regex peft full-matches, and writes only the
`ln_tuning_layers` tensors. Import also reads peft's own llava default: the whole projector as
one target (`multi_modal_projector.ln_tuning_layers[.default].linear_1.weight`) and the
`base_layer` copies peft saves for targeted embeddings (ignored: they are the base weights).
"""
from __future__ import annotations

import re

import jax.numpy as jnp
import numpy as np

from mllm_tune.tuning.peft import format as peft_io
from mllm_tune.checkpoints.hf import TO_HF, TO_OURS
from mllm_tune.checkpoints.safetensors_io import CheckpointError
from mllm_tune import pytree
from mllm_tune.tuning.api import MethodError
from mllm_tune.tuning.selective.by_path import LN_PRESETS, LNTuning

LN_KEY = re.compile(r"(?P<module>.+)\.ln_tuning_layers\.(default\.)?(?P<param>.+)")
BASE_KEY = re.compile(r".+\.base_layer\.[^.]+")


def export_ln_tuning(method: LNTuning, model, variables: dict):
  """-> (adapter_config, tensors): every module with a trained param, all its params."""
  cfg = model.config
  params = pytree.flatten(variables["params"])
  mask = pytree.flatten(method.trainable(variables)["params"])
  rules = peft_io.tensor_rules(cfg, peft_io.export_layout(cfg))
  trained_modules = set()
  for hf_name, path, layer, _ in rules:
    m = mask[path]
    on = bool(np.any(m)) if layer is None or np.ndim(m) == 0 else bool(np.any(m[layer]))
    if on:
      trained_modules.add(hf_name.rsplit(".", 1)[0])
  if not trained_modules:
    raise MethodError("ln_tuning export: no trained parameter")
  tensors = {}
  for hf_name, path, layer, kind in rules:
    module, param = hf_name.rsplit(".", 1)
    if module in trained_modules:
      value = np.asarray(params[path], np.float32)
      value = value[layer] if layer is not None else value
      tensors[f"{peft_io.PREFIX}{module}.ln_tuning_layers.{param}"] = TO_HF[kind](value)
  config = {"peft_type": "LN_TUNING", "target_modules": peft_io.targets_regex(
      sorted(trained_modules)), "exclude_modules": None, "modules_to_save": None}
  return config, tensors


def _method_for(trained: set[str], params: dict) -> LNTuning:
  """The preset whose mask is exactly `trained` (flat params paths x layers), else targets."""
  for preset in LN_PRESETS:
    candidate = LNTuning(preset=preset)
    mask = pytree.flatten(candidate.trainable({"params": params, "adapters": {}})["params"])
    want = {(p, i) for p, m in mask.items() for i in _layers_on(m, params, p)}
    if want == trained:
      return candidate
  return LNTuning(targets=tuple(sorted(re.escape(pytree.logical_path(p, i))
                                       for p, i in trained)))


def _layers_on(m, params, path):
  if np.ndim(m) == 0:
    if not m:
      return []
    leaf = pytree.flatten(params)[path]
    return list(range(np.shape(leaf)[0])) if pytree.is_stacked(path) else [None]
  return [int(i) for i in np.flatnonzero(np.asarray(m).reshape(-1))]


def import_ln_tuning(config: dict, tensors: dict, model, params: dict, where: str):
  """peft LN_TUNING adapter -> (LNTuning, variables with the adapter's weights in place)."""
  lookup = peft_io.tensor_lookup(model.config)
  flat = {p: np.array(x) for p, x in pytree.flatten(params).items()}
  trained = set()
  for key, arr in sorted(tensors.items()):
    if not key.startswith(peft_io.PREFIX):
      raise CheckpointError(f"{where}: tensor '{key}' does not start with '{peft_io.PREFIX}'")
    name = key[len(peft_io.PREFIX):]
    if BASE_KEY.fullmatch(name):
      continue  # peft's copy of a targeted embedding's base weight
    m = LN_KEY.fullmatch(name)
    if not m:
      raise CheckpointError(f"{where}: tensor '{key}' is not an LN_TUNING tensor "
                            "(<module>.ln_tuning_layers.<param>)")
    hf_name = f"{m['module']}.{m['param']}"
    if hf_name not in lookup:
      raise MethodError(f"{where}: tensor '{key}' targets '{hf_name}', which this model does "
                        "not have")
    path, layer, kind = lookup[hf_name]
    value = TO_OURS[kind](np.asarray(arr, np.float32))
    current = flat[path] if layer is None else flat[path][layer]
    peft_io.check_shape(value, np.shape(current), key, where)
    if layer is None:
      flat[path] = value.astype(flat[path].dtype)
    else:
      flat[path][layer] = value
    trained.add((path, layer))
  new_params = pytree.unflatten({p: jnp.asarray(x) for p, x in flat.items()})
  return _method_for(trained, params), {"params": new_params, "adapters": {}}
