"""Our own model format: `mllm_config.json` + an orbax params checkpoint under `params/`.

It is what `mllm-tune convert` produces from a HF directory and what training runs start from:
restoring places every array directly on its target sharding, on any number of hosts.
"""
from __future__ import annotations

import json
import os

import jax
import orbax.checkpoint as ocp

from mllm_tune.checkpoints.safetensors_io import CheckpointError
from mllm_tune.models import build_model, param_shapes
from mllm_tune.models.config import config_from_dict, config_to_dict

CONFIG_FILE = "mllm_config.json"


def save_native(out_dir: str, model, params: dict) -> None:
  out_dir = os.path.abspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
    json.dump(config_to_dict(model.config), f, indent=2, sort_keys=True)
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(os.path.join(out_dir, "params"), params, force=True)
  ckpt.wait_until_finished()


def read_native_config(path: str):
  """The model config of a native checkpoint directory."""
  cfg_file = os.path.join(os.path.abspath(path), CONFIG_FILE)
  if not os.path.isfile(cfg_file):
    raise CheckpointError(f"{os.path.abspath(path)}: no {CONFIG_FILE} (not an mllm_tune "
                          "checkpoint)")
  with open(cfg_file) as f:
    return config_from_dict(json.load(f))


def load_native(path: str, sharding_fn=None):
  """-> (model, params); `sharding_fn(path, shape)` as in `load_pretrained`."""
  path = os.path.abspath(path)
  model = build_model(read_native_config(path))
  shapes = param_shapes(model)
  default = jax.sharding.SingleDeviceSharding(jax.devices()[0])

  def target(kp, x):
    name = "/".join(str(k.key) for k in kp)
    sharding = sharding_fn(name, tuple(x.shape)) if sharding_fn else default
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

  abstract = jax.tree_util.tree_map_with_path(target, shapes)
  params = ocp.StandardCheckpointer().restore(os.path.join(path, "params"), abstract)
  return model, params
