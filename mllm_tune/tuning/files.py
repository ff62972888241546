"""Our own adapter file, for every method (with or without a PEFT counterpart).

`mllm_adapter.json` (format version, the method's registry name and options, the base model it
was trained on) + `adapters.safetensors` holding every adapter leaf (`adapters/<path>`) and every
base leaf the method trained (`params/<path>`, the full leaf), in float32 with storage (stacked)
paths as keys. Loading puts the trained base leaves over the given (original) base params, so a
selective method's result ships without the untouched weights; methods that rewrite the base at
init (PiSSA's residual) redo it from their saved constants (`Method.rebase`).
"""
from __future__ import annotations

import dataclasses
import json
import os

import jax.numpy as jnp
import numpy as np

from mllm_tune.checkpoints.safetensors_io import CheckpointError, SafetensorsFile, write_safetensors
from mllm_tune.tuning import api
from mllm_tune import pytree

CONFIG_FILE = "mllm_adapter.json"
WEIGHTS_FILE = "adapters.safetensors"
FORMAT_VERSION = 1


def method_config(method: api.Method) -> dict:
  """JSON form of a method's options (`from_config` rebuilds it); array-valued fields (e.g. a
  data-derived mask) are omitted: the trained leaves they produced are saved instead."""
  if isinstance(method, api.Compose):
    return {"methods": [method_config(m) for m in method.methods]}
  out = {"name": method.name}
  for f in dataclasses.fields(method):
    v = getattr(method, f.name)
    try:
      json.dumps(v)
    except TypeError:
      continue
    out[f.name] = list(v) if isinstance(v, tuple) else v
  return out


def save_adapters(out_dir: str, method: api.Method, variables: dict, mask: dict | None = None,
                  base_model: str = "") -> None:
  mask = method.trainable(variables) if mask is None else mask
  flat_m = pytree.flatten(mask)
  tensors = {f"adapters/{p}": x for p, x in pytree.flatten(variables.get("adapters", {})).items()}
  tensors.update({f"params/{p}": x for p, x in pytree.flatten(variables["params"]).items()
                  if pytree.mask_any(flat_m.get(f"params/{p}", False))})
  os.makedirs(out_dir, exist_ok=True)

  def kind(v):  # float leaves as float32; integer leaves (token ids) keep an integer type
    return np.dtype(np.int32 if np.issubdtype(np.dtype(v.dtype), np.integer) else np.float32)
  specs = [(k, tuple(np.shape(v)), kind(v), (lambda v=v: np.asarray(v, kind(v))))
           for k, v in sorted(tensors.items())]
  write_safetensors(os.path.join(out_dir, WEIGHTS_FILE), specs, {"format": "mllm_tune"})
  with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
    json.dump({"format_version": FORMAT_VERSION, "method": method_config(method),
               "base_model": base_model}, f, indent=2, sort_keys=True)


def load_adapters(path: str, params: dict) -> tuple[api.Method, dict]:
  """-> (method, variables) with the saved leaves over `params` (shapes checked)."""
  cfg_file = os.path.join(path, CONFIG_FILE)
  if not os.path.isfile(cfg_file):
    raise CheckpointError(f"{path}: no {CONFIG_FILE} (not an mllm_tune adapter directory)")
  with open(cfg_file) as f:
    meta = json.load(f)
  if meta.get("format_version") != FORMAT_VERSION:
    raise CheckpointError(f"{cfg_file}: format_version {meta.get('format_version')!r} is not "
                          f"{FORMAT_VERSION}")
  method = api.from_config(meta["method"])
  st = SafetensorsFile(os.path.join(path, WEIGHTS_FILE))
  flat_params = pytree.flatten(params)
  adapters = {}
  for key in st.keys():
    kind, _, leaf = key.partition("/")
    arr = np.asarray(st.get(key))
    if kind == "params":
      if leaf not in flat_params:
        raise CheckpointError(f"{path}: tensor '{key}' has no counterpart in the base params")
      want = tuple(np.shape(flat_params[leaf]))
      if arr.shape != want:
        raise CheckpointError(f"{path}: tensor '{key}' has shape {list(arr.shape)} but the "
                              f"base model's leaf is {list(want)}")
      flat_params[leaf] = jnp.asarray(arr, flat_params[leaf].dtype)
    elif kind == "adapters":
      adapters[leaf] = jnp.asarray(arr)
    else:
      raise CheckpointError(f"{path}: tensor '{key}' is neither params/ nor adapters/")
  variables = {"params": pytree.unflatten(flat_params), "adapters": pytree.unflatten(adapters)}
  _check_adapter_shapes(path, method, variables)
  return method, method.rebase(variables)


def _check_adapter_shapes(path: str, method: api.Method, variables: dict) -> None:
  """Adapters must match what the method would create on this base (catches a wrong base)."""
  import jax
  fresh = jax.eval_shape(lambda: method.init_variables(jax.random.key(0),
                                                       variables["params"])["adapters"])
  want = {p: tuple(x.shape) for p, x in pytree.flatten(fresh).items()}
  got = {p: tuple(np.shape(x)) for p, x in pytree.flatten(variables["adapters"]).items()}
  for p in sorted(set(want) | set(got)):
    if want.get(p) != got.get(p):
      raise CheckpointError(f"{path}: adapter leaf '{p}' has shape {got.get(p)} but method "
                            f"'{api.label(method)}' on this base needs {want.get(p)}")
