"""What a PEFT LoRA adapter carries beside its factors: `modules_to_save`, `bias`, base copies.

peft saves (keys after `base_model.model.`, adapter name removed):
  modules_to_save   every tensor of each wrapped module under its plain name
                    (`model.multi_modal_projector.linear_1.weight`): trained copies of whole modules
  bias = all        every tensor named `*.bias` in the model; lora_only: the biases of the
                    LoRA-wrapped modules; a wrapped module's bias is `<module>.base_layer.bias`
  base copies       `<module>.base_layer.weight` of a LoRA-wrapped embedding or LM head (saved by
                    default when one is targeted, `save_embedding_layers="auto"`): unchanged
                    weights of the base

Import maps modules_to_save to `freeze` (a preset when one matches exactly, else explicit
targets) and trained biases to `bitfit`, beside the LoRA: `compose(lora, freeze(...),
bitfit(...))`, with the saved values in the base params. Base copies are checked equal to the base
and skipped. Export goes the other way from what a composition trains (its mask): every module
with a trained non-bias tensor becomes a `modules_to_save` entry (all its tensors written), the
remaining trained biases become `bias="lora_only"` when they all belong to LoRA-wrapped modules,
else `bias="all"` (every bias of the model written, untrained ones with their base values, which
is exact). Element-wise masks (sparse selective methods) and a module both LoRA-wrapped and fully
trained have no PEFT form and are refused.
"""
from __future__ import annotations

import re

import jax.numpy as jnp
import numpy as np

from mllm_tune.checkpoints.hf import TO_HF, TO_OURS
from mllm_tune.checkpoints.safetensors_io import CheckpointError
from mllm_tune import pytree
from mllm_tune.tuning.api import Method, MethodError
from mllm_tune.tuning.peft import format as peft_io
from mllm_tune.tuning.selective.by_path import FREEZE_PRESETS, BitFit, Freeze

BIAS_MODES = ("none", "lora_only", "all")
BASE_LAYER = ".base_layer."


def is_lora_tensor(name: str) -> bool:
  return (".lora_A." in name or ".lora_B." in name or name.endswith(".lora_magnitude_vector")
          or ".lora_embedding_" in name)


def _module(hf_name: str) -> str:
  return hf_name.rsplit(".", 1)[0]


def modules_to_save(config: dict) -> list[str]:
  mts = config.get("modules_to_save") or []
  return [mts] if isinstance(mts, str) else list(mts)


def in_modules_to_save(module: str, names: list[str]) -> bool:
  """peft's rule: a module is wrapped when its name (or an enclosing module's) ends with an
  entry of `modules_to_save` (plain `str.endswith`)."""
  parts = module.split(".")
  return any(".".join(parts[:k]).endswith(m) for k in range(1, len(parts) + 1) for m in names)


# ----------------------------------------------------------------------------- import
def split_tensors(config: dict, tensors: dict, model, params: dict, where: str):
  """-> (LoRA tensors, {(path, layer): value} to put in the params, trained (path, layer) of
  modules_to_save, trained (path, layer) of biases). Base copies are checked and dropped."""
  bias = config.get("bias", "none")
  if bias not in BIAS_MODES:
    raise MethodError(f"{where}: adapter_config.json field 'bias' is {bias!r}; PEFT LoRA "
                      f"has {list(BIAS_MODES)}")
  mts = modules_to_save(config)
  lookup = peft_io.tensor_lookup(model.config)
  flat = pytree.flatten(params)
  lora, values, mts_set, bias_set = {}, {}, set(), set()
  for key, arr in sorted(tensors.items()):
    if not key.startswith(peft_io.PREFIX):
      raise CheckpointError(f"{where}: tensor '{key}' does not start with '{peft_io.PREFIX}'")
    name = key[len(peft_io.PREFIX):]
    if is_lora_tensor(name):
      lora[key] = arr
      continue
    hf = name.replace(BASE_LAYER, ".")
    if hf not in lookup:
      if _module(hf).rsplit(".", 1)[-1] == "lm_head":  # says so when the head is tied
        raise peft_io.unknown_module(model.config, key, _module(hf), where)
      raise MethodError(f"{where}: tensor '{key}' is neither a LoRA factor nor a tensor of this "
                        f"model ('{hf}')")
    path, layer, kind = lookup[hf]
    value = TO_OURS[kind](np.asarray(arr, np.float32))
    base = np.asarray(flat[path] if layer is None else flat[path][layer], np.float32)
    peft_io.check_shape(value, base.shape, key, where)
    if mts and in_modules_to_save(_module(hf), mts):
      mts_set.add((path, layer))
    elif bias != "none" and hf.endswith(".bias"):
      bias_set.add((path, layer))
    else:  # peft's copy of a base layer (an embedding / LM head it wraps)
      if not np.array_equal(value, base):
        raise MethodError(
            f"{where}: tensor '{key}' is peft's copy of the base weight '{hf}', but it differs "
            f"from this base model's (max |diff| {float(np.max(np.abs(value - base))):.3g}): the "
            "adapter was saved from another base model; load the base it was trained on")
      continue
    values[(path, layer)] = value
  return lora, values, mts_set, bias_set


def put_values(params: dict, values: dict) -> dict:
  """Params with the saved tensors `{(path, layer): value}` in place."""
  if not values:
    return params
  flat = {p: np.array(x) for p, x in pytree.flatten(params).items()}
  for (path, layer), v in values.items():
    if layer is None:
      flat[path] = v.astype(flat[path].dtype)
    else:
      flat[path][layer] = v
  return pytree.unflatten({p: jnp.asarray(x) for p, x in flat.items()})


def targets_for(pairs: set, params: dict) -> tuple[str, ...]:
  """Anchored logical-path regexes selecting exactly the (path, layer) pairs."""
  by_path: dict[str, set] = {}
  for path, layer in pairs:
    by_path.setdefault(path, set()).add(layer)
  shapes = {leaf.path: leaf for leaf in pytree.leaves(params)}
  out = []
  for path, layers in sorted(by_path.items()):
    if None in layers:
      out.append(re.escape(path))
      continue
    root, _, rest = path.split("/", 2)
    n = shapes[path].num_layers
    which = r"\d+" if len(layers) == n else "(" + "|".join(map(str, sorted(layers))) + ")"
    out.append(f"{re.escape(root)}/layers_{which}/{re.escape(rest)}")
  return tuple(out)


def trained_pairs(mask: dict, params: dict, where: str) -> set:
  """(path, layer) pairs a params mask trains whole; element-wise masks are refused."""
  out = set()
  flat = pytree.flatten(params)
  for path, m in pytree.flatten(mask).items():
    if not pytree.mask_any(m):
      continue
    shape = np.shape(flat[path])
    stacked = pytree.is_stacked(path)
    m = np.broadcast_to(np.asarray(m, bool), shape)
    rows = m.reshape(shape[0], -1) if stacked else m.reshape(1, -1)
    for i, row in enumerate(rows):
      if row.any() and not row.all():
        what = pytree.logical_path(path, i if stacked else None)
        raise MethodError(f"{where}: '{what}' is trained element-wise (a sparse mask); PEFT "
                          "can only save whole modules (modules_to_save) or biases (bias=)")
      if row.all():
        out.add((path, i if stacked else None))
  return out


def _pairs_of(method: Method, params: dict) -> set:
  """What `method` trains on these params (empty when its selectors match nothing here)."""
  try:
    mask = method.trainable({"params": params, "adapters": {}})["params"]
  except (pytree.SelectorError, MethodError):
    return set()
  return trained_pairs(mask, params, "")


def selective_methods(params: dict, mts_set: set, bias_set: set) -> list[Method]:
  """The methods that train what modules_to_save and bias= trained: freeze, bitfit."""
  out = []
  if mts_set:
    preset = next((p for p in FREEZE_PRESETS if p not in ("full", "llm_last_k") and
                   _pairs_of(Freeze(preset=p), params) == mts_set), None)
    out.append(Freeze(preset=preset) if preset else Freeze(targets=targets_for(mts_set, params)))
  rest = bias_set - mts_set
  if rest:
    every = _pairs_of(BitFit(), params)
    out.append(BitFit() if rest == every else BitFit(targets=targets_for(rest, params)))
  return out


# ----------------------------------------------------------------------------- export
def export_extras(method: Method, model, variables: dict, lora_modules: set[str]):
  """-> ({"modules_to_save", "bias"}, tensors) for the base params `method` trains."""
  cfg = model.config
  params = variables["params"]
  where = "PEFT export"
  pairs = trained_pairs(method.trainable(variables)["params"], params, where)
  if not pairs:
    return {"modules_to_save": None, "bias": "none"}, {}
  rules = peft_io.tensor_rules(cfg, peft_io.export_layout(cfg))
  trained = {hf for hf, path, layer, _ in rules if (path, layer) in pairs}
  mts = {_module(hf) for hf in trained if not hf.endswith(".bias")}
  clash = sorted(mts & lora_modules)
  if clash:
    raise MethodError(f"{where}: {clash} carry LoRA and are also trained in full; PEFT wraps a "
                      "module one way or the other (target_modules or modules_to_save)")
  biases = {hf for hf in trained if hf.endswith(".bias") and _module(hf) not in mts}
  lora_biases = {hf for hf, *_ in rules if hf.endswith(".bias") and _module(hf) in lora_modules}
  if not biases:
    bias, written = "none", set()
  elif biases <= lora_biases:
    bias, written = "lora_only", lora_biases
  else:
    bias = "all"
    written = {hf for hf, *_ in rules if hf.endswith(".bias") and _module(hf) not in mts}
  flat = pytree.flatten(params)
  tensors = {}
  for hf, path, layer, kind in rules:
    if _module(hf) in mts or hf in written:
      value = np.asarray(flat[path] if layer is None else flat[path][layer], np.float32)
      name = hf
      if _module(hf) in lora_modules:  # a LoRA-wrapped module's own tensors sit in base_layer
        name = f"{_module(hf)}.base_layer.{hf.rsplit('.', 1)[1]}"
      tensors[peft_io.PREFIX + name] = TO_HF[kind](value)
  return {"modules_to_save": sorted(mts) or None, "bias": bias}, tensors
