"""VeRA: shared frozen random projections, tiny trainable per-layer vectors (METHODS.md 4.5).

torch: `y = W0 x + b ⊙ (B_sl (d ⊙ (A_sl x)))` with one shared `A_sh (r, D_in)`, `B_sh (D_out, r)`
(D = max over targets), `A_sl = A_sh[:, :d_in]`, `B_sl = B_sh[:d_out]`. Kaiming-uniform init with
gain sqrt(2) (bound sqrt(6 / shape[1])), drawn from `projection_prng_key` with JAX's PRNG (so it
differs from torch's: exports always carry the projections, peft `save_projection=True`).
Trainable: `d (r,)` (init `d_initial`) and `b (d_out,)` (init 0). Each targeted Linear stores its
slices as constants `vera_a (d_in, r)`, `vera_b (r, d_out)` beside `vera_d`, `vera_bvec`.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from mllm_tune.checkpoints import peft as peft_io
from mllm_tune.tuning import select
from mllm_tune.tuning.api import (PEFT_EXPORTERS, PEFT_IMPORTERS, Method, MethodError,
                                  register)
from mllm_tune.tuning.lora import (DEFAULT_TARGETS, _layer_mask, adapter_path, get_leaf,
                                   resolve_targets)


def kaiming_uniform(rng, shape_torch: tuple[int, int]) -> np.ndarray:
  bound = math.sqrt(6.0 / shape_torch[1])
  return np.asarray(jax.random.uniform(rng, shape_torch, jnp.float32, -bound, bound))


@register("vera", "reparameterization")
@dataclasses.dataclass(frozen=True)
class VeRA(Method):
  rank: int = 256
  d_initial: float = 0.1
  dropout: float = 0.0
  targets: str | tuple[str, ...] = DEFAULT_TARGETS
  projection_prng_key: int = 0

  def shared_projections(self, params) -> tuple[np.ndarray, np.ndarray]:
    """(A_sh (r, D_in), B_sh (D_out, r)) in torch layout, from `projection_prng_key`."""
    shapes = [np.shape(get_leaf(params, p))[-2:] for p in resolve_targets(params, self.targets)]
    d_in, d_out = max(s[0] for s in shapes), max(s[1] for s in shapes)
    ka, kb = jax.random.split(jax.random.key(self.projection_prng_key))
    return kaiming_uniform(ka, (self.rank, d_in)), kaiming_uniform(kb, (d_out, self.rank))

  def init(self, rng, params):
    del rng
    a_sh, b_sh = self.shared_projections(params)
    return select.unflatten(self._adapters(params, a_sh, b_sh))

  def _adapters(self, params, a_sh, b_sh, d=None, bvec=None) -> dict:
    out = {}
    for path, flags in resolve_targets(params, self.targets).items():
      *lead, d_in, d_out = np.shape(get_leaf(params, path))
      a = np.broadcast_to(a_sh[:, :d_in].T, (*lead, d_in, self.rank))
      b = np.broadcast_to(b_sh[:d_out].T, (*lead, self.rank, d_out))
      out[adapter_path(path, "vera_a")] = jnp.asarray(a, jnp.float32)
      out[adapter_path(path, "vera_b")] = jnp.asarray(b, jnp.float32)
      dv = (d[path] if d is not None and path in d
            else np.full((*lead, self.rank), self.d_initial, np.float32))
      if lead:  # untargeted layers of a stacked module contribute nothing
        dv = dv * np.asarray(flags, np.float32)[:, None]
      out[adapter_path(path, "vera_d")] = jnp.asarray(dv, jnp.float32)
      bv = np.zeros((*lead, d_out), np.float32) if bvec is None or path not in bvec else bvec[path]
      out[adapter_path(path, "vera_bvec")] = jnp.asarray(bv, jnp.float32)
      if self.dropout:
        out[adapter_path(path, "lora_dropout")] = jnp.asarray(
            np.where(flags, self.dropout, 0.0).astype(np.float32))
    return out

  def trainable(self, variables):
    flat = select.flatten(super().trainable(variables))
    for path, flags in resolve_targets(variables["params"], self.targets).items():
      for leaf in ("vera_d", "vera_bvec"):
        flat["adapters/" + adapter_path(path, leaf)] = _layer_mask(flags, 2 if flags.ndim else 1)
    return select.unflatten(flat)

  def merge(self, variables):
    params = select.flatten(variables["params"])
    ad = select.flatten(variables["adapters"])
    for path in resolve_targets(variables["params"], self.targets):
      get = lambda n: jnp.asarray(ad[adapter_path(path, n)], jnp.float32)
      delta = jnp.matmul(get("vera_a") * get("vera_d")[..., None, :], get("vera_b"))
      delta = delta * get("vera_bvec")[..., None, :]
      params[path] = (jnp.asarray(params[path], jnp.float32) + delta).astype(params[path].dtype)
    return select.unflatten(params)


# ----------------------------------------------------------------------------- PEFT (VERA)
def export_vera(method: VeRA, model, variables):
  params, ad = variables["params"], select.flatten(variables["adapters"])
  tensors, names = {}, []
  a_sh, b_sh = None, None
  for path, flags in sorted(resolve_targets(params, method.targets).items()):
    a = np.asarray(ad[adapter_path(path, "vera_a")])
    b = np.asarray(ad[adapter_path(path, "vera_b")])
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
          path, "vera_d")]))
      tensors[f"{peft_io.PREFIX}{name}.vera_lambda_b"] = sl(np.asarray(ad[adapter_path(
          path, "vera_bvec")]))
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
  return method, {"params": params, "adapters": select.unflatten(adapters)}


PEFT_EXPORTERS["vera"] = export_vera
PEFT_IMPORTERS["VERA"] = import_vera
