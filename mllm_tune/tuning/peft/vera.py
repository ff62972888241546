"""PEFT VERA <-> `vera`: shared projections `vera_A` / `vera_B`, per-layer `lambda_d` /
`lambda_b`."""
from __future__ import annotations

import numpy as np

from mllm_tune.models.adapters import VERA_A, VERA_B, VERA_BVEC, VERA_D
from mllm_tune import pytree
from mllm_tune.tuning.api import MethodError
from mllm_tune.tuning.peft import format as peft_io
from mllm_tune.tuning.reparam.lora import adapter_path, get_leaf, resolve_targets
from mllm_tune.tuning.reparam.vera import VeRA


def export_vera(method: VeRA, model, variables):
  params, ad = variables["params"], pytree.flatten(variables["adapters"])
  tensors, names = {}, []
  a_sh, b_sh = None, None
  for path, flags in sorted(resolve_targets(params, method.targets).items()):
    a = np.asarray(ad[adapter_path(path, VERA_A)])
    b = np.asarray(ad[adapter_path(path, VERA_B)])
    a1, b1 = (a[0], b[0]) if flags.ndim else (a, b)
    if a_sh is None or a1.shape[0] > a_sh.shape[1]:
      a_sh = a1.T
    if b_sh is None or b1.shape[1] > b_sh.shape[0]:
      b_sh = b1.T
    layers = list(np.flatnonzero(flags)) if flags.ndim else [None]
    for i in layers:
      sl = (lambda x: x[i]) if i is not None else (lambda x: x)
      name = peft_io.hf_module_name(model.config, path, i)
      names.append(name)
      tensors[f"{peft_io.PREFIX}{name}.vera_lambda_d"] = sl(np.asarray(ad[adapter_path(
          path, VERA_D)]))
      tensors[f"{peft_io.PREFIX}{name}.vera_lambda_b"] = sl(np.asarray(ad[adapter_path(
          path, VERA_BVEC)]))
  tensors["base_model.vera_A"] = a_sh
  tensors["base_model.vera_B"] = b_sh
  config = {"peft_type": "VERA", "r": method.rank, "d_initial": method.d_initial,
            "vera_dropout": method.dropout, "projection_prng_key": method.projection_prng_key,
            "save_projection": True, "bias": "none", "fan_in_fan_out": False,
            "modules_to_save": None, "layers_to_transform": None,
            "target_modules": peft_io.targets_regex(names)}
  return config, tensors


def import_vera(config, tensors, model, params, where):
  if not config.get("save_projection", True) or "base_model.vera_A" not in tensors:
    raise MethodError(f"{where}: VeRA adapter saved without its projections "
                      "(save_projection=False): torch's PRNG cannot be reproduced here")
  a_sh, b_sh = tensors.pop("base_model.vera_A"), tensors.pop("base_model.vera_B")
  lookup = peft_io.module_lookup(model.config)
  found: dict[str, dict] = {}
  for key, arr in tensors.items():
    module, suffix = peft_io.split_key(key, ("vera_lambda_d", "vera_lambda_b"), where)
    if module not in lookup:
      raise MethodError(f"{where}: tensor '{key}' targets module '{module}' that this model "
                        "does not have")
    path, layer = lookup[module]
    found.setdefault(path, {}).setdefault(suffix, {})[layer] = arr
  r = int(config["r"])
  method = VeRA(rank=r, d_initial=float(config.get("d_initial", 0.1)),
                dropout=float(config.get("vera_dropout", 0.0)),
                projection_prng_key=int(config.get("projection_prng_key", 0)),
                targets=tuple(sorted(peft_io.logical_target(p, i) for p, d in found.items()
                                     for i in d["vera_lambda_d"])))
  d, bvec = {}, {}
  for path, parts in found.items():
    k_shape = np.shape(get_leaf(params, path))
    d_out = k_shape[-1]
    for i, v in parts["vera_lambda_b"].items():
      peft_io.check_shape(v, (d_out,), f"{path} layer {i} vera_lambda_b", where)
    d[path] = np.asarray(peft_io.to_stacked(parts["vera_lambda_d"], k_shape, (r,)))
    bvec[path] = np.asarray(peft_io.to_stacked(parts["vera_lambda_b"], k_shape, (d_out,)))
  need_in = max(np.shape(get_leaf(params, p))[-2] for p in found)
  need_out = max(np.shape(get_leaf(params, p))[-1] for p in found)
  if a_sh.shape[0] != r or a_sh.shape[1] < need_in or b_sh.shape[0] < need_out:
    raise MethodError(f"{where}: vera_A {list(a_sh.shape)} / vera_B {list(b_sh.shape)} do not "
                      f"cover r={r}, d_in={need_in}, d_out={need_out}")
  adapters = method._adapters(params, a_sh, b_sh, d, bvec)
  return method, {"params": params, "adapters": pytree.unflatten(adapters)}
