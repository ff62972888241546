"""PEFT `LORA` export/import for LoRA, rsLoRA, DoRA, PiSSA and LoRASculpt, alone or composed.

Export: a LoRA-family method, or a composition of one with methods that train base params in
place (`freeze`, `bitfit`, `ln_tuning`: modules_to_save / bias=, see `extras.py`) and with
`trainable_tokens` (`trainable_token_indices`, see `tokens.py`). PiSSA goes out
as plain LoRA on the original base (docs/methods.md §4.4 b). Per-module ranks and alphas are
written as explicit `rank_pattern` / `alpha_pattern` entries (escaped full module names).

Import reads what peft writes: `rank_pattern` / `alpha_pattern` resolved per module with peft's
own rule (`(.*\\.)?(key)$`), modules_to_save, bias, peft's base-layer copies (checked, skipped).
`init_lora_weights` that rewrite the base (peft keeps the residual in the model, not in the
adapter): "pissa" (exact SVD) is rebuilt as our `pissa` on the original base; the others
(pissa_niter_*, olora, corda, loftq, lora_ga) are refused, pointing to peft's conversion.
"""
from __future__ import annotations

import json
import os
import re

import jax
import numpy as np

from mllm_tune.models.adapters import (DORA_M, LORA_A, LORA_B, LORA_BIAS, LORA_DROPOUT,
                                       LORA_SCALE, PISSA_A0, PISSA_B0)
from mllm_tune import pytree
from mllm_tune.tuning.api import Compose, MethodError, compose, label
from mllm_tune.tuning.peft import experts, extras, tokens
from mllm_tune.tuning.peft import format as peft_io
from mllm_tune.tuning.reparam.lora import LoRA, PiSSA, adapter_path, get_leaf, pissa_to_lora
from mllm_tune.tuning.selective.tokens import CLASH, TrainableTokens

LORA_SUFFIXES = ("lora_A.weight", "lora_B.weight", "lora_B.bias", "lora_magnitude_vector")
# peft's Embedding names its factors (same orientation as a Linear's lora_A / lora_B weights)
EMBEDDING_SUFFIXES = {"lora_embedding_A": "lora_A.weight", "lora_embedding_B": "lora_B.weight"}
INIT_KEEPS_BASE = (True, False, "gaussian", "eva", "orthogonal", "mica")
UNSUPPORTED = ("use_qalora", "layer_replication", "alora_invocation_tokens")
LORA_LEAVES = (LORA_A, LORA_B, LORA_BIAS, LORA_SCALE, LORA_DROPOUT, DORA_M, PISSA_A0, PISSA_B0)


# ----------------------------------------------------------------------------- export
def _split(method):
  """(the LoRA-family member, the others) of a method or composition."""
  members = list(method.methods) if isinstance(method, Compose) else [method]
  loras = [m for m in members if isinstance(m, LoRA)]
  if len(loras) != 1:
    raise MethodError(f"PEFT LORA export needs exactly one LoRA-family method, got "
                      f"{[label(m) for m in members]}")
  return loras[0], [m for m in members if m is not loras[0]]


def export_lora(method, model, variables: dict):
  lora, others = _split(method)
  with_tokens = any(isinstance(m, TrainableTokens) for m in others)
  if lora.name == "pissa":  # plain LoRA on the original base (docs/methods.md §4.4 b)
    pissa = lora
    lora, variables = pissa_to_lora(pissa, variables)
    if isinstance(method, Compose):
      method = compose(*[lora if m is pissa else m for m in method.methods])
    else:
      method = lora
  cfg = model.config
  adapters = pytree.flatten(variables["adapters"])
  layout = lora.layout(variables["params"])
  leaves = [x for x in LORA_LEAVES if (x != DORA_M or lora.use_dora)
            and (x != LORA_BIAS or lora.lora_bias)]
  owned = {adapter_path(p, leaf) for p in layout for leaf in leaves}
  if with_tokens:  # written as peft's trainable_token_indices
    owned |= {tokens.ROWS, tokens.IDS}
  foreign = sorted(set(adapters) - owned)
  if foreign:
    raise MethodError(f"PEFT LORA export: adapter leaves {foreign[:5]} belong to no LoRA target "
                      "(a PEFT LoRA adapter holds only LoRA factors)")
  tensors, names, rank_pattern, alpha_pattern = {}, [], {}, {}
  expert_names = {peft_io.hf_module_name(cfg, p, int(i)) for p, lay in layout.items()
                  if pytree.is_expert_path(p) for i in np.flatnonzero(lay.flags)}
  experts.check_exportable(lora, sorted(expert_names))
  for path, lay in sorted(layout.items()):
    get = lambda leaf: np.asarray(adapters[adapter_path(path, leaf)], np.float32)
    a, b = get(LORA_A), get(LORA_B)
    m = get(DORA_M) if lora.use_dora else None
    bias = get(LORA_BIAS) if lora.lora_bias else None
    layers = list(np.flatnonzero(lay.flags)) if lay.flags.ndim else [None]
    for i in layers:
      sl = (lambda x: x[i]) if i is not None else (lambda x: x)
      r, alpha = int(sl(lay.ranks)), float(sl(lay.alphas))
      name = peft_io.hf_module_name(cfg, path, i)
      names.append(name)
      if r != lora.rank:
        rank_pattern[re.escape(name)] = r
      if alpha != float(lora.alpha):
        alpha_pattern[re.escape(name)] = alpha
      if name in expert_names:  # peft's ParamWrapper factors (tuning/peft/experts.py)
        key = f"{peft_io.PREFIX}{experts.tensor_module(name, expert_names)}"
        (tensors[f"{key}.lora_A.weight"],
         tensors[f"{key}.lora_B.weight"]) = experts.to_peft(sl(a)[..., :r], sl(b)[:, :r])
        continue
      key = f"{peft_io.PREFIX}{name}"
      if path == pytree.TOKEN_EMBEDDING:
        tensors[f"{key}.lora_embedding_A"] = a[:, :r].T
        tensors[f"{key}.lora_embedding_B"] = b[:r].T
        if m is not None:
          tensors[f"{key}.lora_magnitude_vector"] = m
        continue
      tensors[f"{key}.lora_A.weight"] = sl(a)[:, :r].T
      tensors[f"{key}.lora_B.weight"] = sl(b)[:r].T
      if m is not None:
        tensors[f"{key}.lora_magnitude_vector"] = sl(m)
      if bias is not None:
        tensors[f"{key}.lora_B.bias"] = sl(bias)
  # an expert stack's module (`...mlp.experts`) is LoRA-wrapped too: no modules_to_save for it
  wrapped = set(names) | {n.rsplit(".", 1)[0] for n in expert_names}
  extra_cfg, extra_tensors = extras.export_extras(method, model, variables, wrapped)
  tensors.update(extra_tensors)
  if with_tokens:
    token_cfg, token_tensors = tokens.lora_extras(model, variables,
                                                  extra_cfg.get("modules_to_save"))
    extra_cfg.update(token_cfg)
    tensors.update(token_tensors)
  config = {"peft_type": "LORA", "r": lora.rank, "lora_alpha": lora.alpha,
            "lora_dropout": lora.dropout, "use_rslora": lora.use_rslora,
            "use_dora": lora.use_dora, "lora_bias": lora.lora_bias, "init_lora_weights": True,
            "fan_in_fan_out": False, "rank_pattern": rank_pattern,
            "alpha_pattern": alpha_pattern, "layers_to_transform": None,
            "target_modules": peft_io.targets_regex(sorted(set(names) - expert_names)),
            **extra_cfg}
  if expert_names:
    config["target_parameters"] = sorted(expert_names)
    if set(names) <= expert_names:  # [] (not None: peft would add its default modules)
      config["target_modules"] = []
  return config, tensors


# ----------------------------------------------------------------------------- import
def pattern_value(pattern: dict, module: str, default):
  """peft's `get_pattern_key`: the first key with `(.*\\.)?(key)$` matching the module."""
  for key, value in (pattern or {}).items():
    if re.match(rf"(.*\.)?({key})$", module):
      return value
  return default


def _check_config(config: dict, where: str) -> None:
  cfg_file = os.path.join(where, peft_io.CONFIG_FILE)
  for key in UNSUPPORTED:
    if config.get(key):
      raise MethodError(f"{cfg_file}: '{key}' = {json.dumps(config[key])} is not supported")
  init = config.get("init_lora_weights", True)
  if init in INIT_KEEPS_BASE or init == "pissa":
    return
  extra = (" (a randomized SVD: its residual cannot be rebuilt here)"
           if str(init).startswith("pissa_niter") else "")
  raise MethodError(
      f"{cfg_file}: init_lora_weights = {json.dumps(init)} makes peft rewrite the base weights"
      f"{extra}; that residual base stays in the peft model and is not in the adapter, so these "
      "factors give wrong results on the original base. Save the adapter with peft's "
      "conversion, `model.save_pretrained(out, path_initial_model_for_weight_conversion="
      "<initial adapter dir>)`, which writes a plain LoRA on the original base, and import that")


def _module_vectors(parts: dict, suffix: str, enabled: bool, flag: str, layers: list,
                    module_of, d_out: int, where: str) -> dict | None:
  """{layer: (d_out,) array} of a per-module vector tensor (DoRA's magnitude, lora_bias's
  lora_B.bias): required on every LoRA-wrapped layer when the config's `flag` is set, refused
  when it is not; None when not enabled."""
  got = parts.get(suffix, {})
  if not enabled:
    if got:
      raise MethodError(f"{where}: {module_of(min(got))} has {suffix} but the config does not "
                        f"set {flag}")
    return None
  for i in layers:
    if i not in got:
      raise MethodError(f"{where}: {flag} is set but {module_of(i)} has no {suffix}")
    peft_io.check_shape(got[i], (d_out,), f"{module_of(i)}.{suffix}", where)
  return got


def import_lora(config: dict, tensors: dict, model, params: dict, where: str):
  _check_config(config, where)
  tensors, with_tokens = tokens.split_lora_tensors(config, tensors, model, params, where)
  if with_tokens is not None and any(".lora_embedding_" in k for k in tensors):
    raise MethodError(f"{where}: {CLASH}")
  lora_tensors, values, mts_set, bias_set = extras.split_tensors(config, tensors, model, params,
                                                                 where)
  lookup = peft_io.module_lookup(model.config)
  wrapped = experts.wrapped_modules(config, [n for n, (p, _) in lookup.items()
                                             if pytree.is_expert_path(p)], where)
  per_module: dict[str, dict] = {}
  modules: dict[tuple, str] = {}
  for key, arr in lora_tensors.items():
    module, suffix = peft_io.split_key(key, LORA_SUFFIXES + tuple(EMBEDDING_SUFFIXES), where)
    embedding_factor = suffix in EMBEDDING_SUFFIXES
    suffix = EMBEDDING_SUFFIXES.get(suffix, suffix)
    module = wrapped.get(module, module)  # an expert stack's factors: its parameter name
    if module not in lookup:
      if embedding_factor:
        raise MethodError(f"{where}: tensor '{key}' is LoRA on the embedding layer '{module}'; "
                          "only the LLM's token embedding takes LoRA here")
      raise peft_io.unknown_module(model.config, key, module, where)
    path, layer = lookup[module]
    factor = embedding_factor or suffix in ("lora_A.weight", "lora_B.weight")
    if factor and embedding_factor != (path == pytree.TOKEN_EMBEDDING):
      raise MethodError(f"{where}: tensor '{key}': peft names the factors of an embedding "
                        "lora_embedding_A/B and those of a Linear lora_A/lora_B.weight; this "
                        f"one does not fit module '{module}'")
    per_module.setdefault(path, {}).setdefault(suffix, {})[layer] = arr
    modules[(path, layer)] = module
  if not per_module:
    raise MethodError(f"{where}: the adapter has no LoRA factors (lora_A / lora_B)")
  r = int(config["r"])
  alpha = float(config.get("lora_alpha", r))
  ranks = {pl: int(pattern_value(config.get("rank_pattern"), m, r)) for pl, m in modules.items()}
  alphas = {pl: float(pattern_value(config.get("alpha_pattern"), m, alpha))
            for pl, m in modules.items()}
  kw = dict(rank=r, alpha=alpha, dropout=float(config.get("lora_dropout", 0.0)),
            use_rslora=bool(config.get("use_rslora", False)),
            use_dora=bool(config.get("use_dora", False)),
            lora_bias=bool(config.get("lora_bias", False)),
            targets=tuple(sorted(peft_io.logical_target(p, i) for p, i in modules)),
            rank_pattern=tuple(sorted((peft_io.logical_target(*pl), v)
                                      for pl, v in ranks.items() if v != r)),
            alpha_pattern=tuple(sorted((peft_io.logical_target(*pl), v)
                                       for pl, v in alphas.items() if v != alpha)))
  pissa = config.get("init_lora_weights") == "pissa"
  if pissa and (kw["use_dora"] or kw["rank_pattern"] or kw["alpha_pattern"]):
    raise MethodError(f"{where}: init_lora_weights='pissa' with use_dora, rank_pattern or "
                      "alpha_pattern is not supported; save with peft's conversion "
                      "(path_initial_model_for_weight_conversion) and import that")
  if pissa:  # rebuild peft's residual base K0 - s A0 B0 from the SVD of the original base
    kw = {k: v for k, v in kw.items() if k not in ("rank_pattern", "alpha_pattern")}
    method = PiSSA(**kw)
    variables = method.init_variables(jax.random.key(0), params)
  else:
    method = LoRA(**kw)
    variables = {"params": params, "adapters": method.init(jax.random.key(0), params)}
  adapters = pytree.flatten(variables["adapters"])
  layout = method.layout(params)
  for path, parts in per_module.items():
    k_shape = tuple(np.shape(get_leaf(params, path)))
    d_in, d_out = k_shape[-2:]
    big_r = layout[path].leaf_rank
    a = {i: v.T for i, v in parts["lora_A.weight"].items()}
    b = {i: v.T for i, v in parts.get("lora_B.weight", {}).items()}
    if set(b) != set(a):
      raise MethodError(f"{where}: module {path} has lora_A for layers {sorted(a)} but "
                        f"lora_B for {sorted(b)}")
    lead = k_shape[1:-2] if len(k_shape) > 3 else ()   # (E,) for an expert stack
    for i in a:
      name = f"{peft_io.PREFIX}{modules[(path, i)]}"
      ri = ranks[(path, i)]
      if lead:  # peft's (r E, in) / (out, r E) expert factors (tuning/peft/experts.py)
        peft_io.check_shape(a[i].T, (ri * lead[0], d_in), f"{name} lora_A.weight", where)
        peft_io.check_shape(b[i].T, (d_out, ri * lead[0]), f"{name} lora_B.weight", where)
        a[i], b[i] = experts.from_peft(a[i].T, b[i].T, lead[0])
      else:
        peft_io.check_shape(a[i], (d_in, ri), f"{name}.lora_A.weight (transposed)", where)
        peft_io.check_shape(b[i], (ri, d_out), f"{name}.lora_B.weight (transposed)", where)
      pad = ((0, 0),) * len(lead)  # ranks below the leaf's: zero padding
      a[i] = np.pad(a[i], pad + ((0, 0), (0, big_r - ri)))
      b[i] = np.pad(b[i], pad + ((0, big_r - ri), (0, 0)))
    adapters[adapter_path(path, LORA_A)] = peft_io.to_stacked(a, k_shape, (*lead, d_in, big_r))
    adapters[adapter_path(path, LORA_B)] = peft_io.to_stacked(b, k_shape, (*lead, big_r, d_out))
    for flag, suffix, leaf in (("use_dora", "lora_magnitude_vector", DORA_M),
                               ("lora_bias", "lora_B.bias", LORA_BIAS)):
      vec = _module_vectors(parts, suffix, getattr(method, flag), flag, sorted(a),
                            lambda i: modules[(path, i)], d_out, where)
      if vec is not None:
        adapters[adapter_path(path, leaf)] = peft_io.to_stacked(vec, k_shape, (d_out,))
  new_params = extras.put_values(variables["params"], values)
  others = extras.selective_methods(params, mts_set, bias_set)
  if with_tokens is not None:  # trainable_token_indices: the rows beside the factors
    others.append(with_tokens[0])
    adapters.update(pytree.flatten(with_tokens[1]["adapters"]))
  out_method = compose(method, *others) if others else method
  return out_method, {"params": new_params, "adapters": pytree.unflatten(adapters)}
