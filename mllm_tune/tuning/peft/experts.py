"""PEFT LoRA on mixture-of-experts weight stacks (`target_parameters`, peft's `lora.ParamWrapper`).

transformers keeps a layer's experts as 3-D parameters of one module (Qwen3-VL-MoE:
`mlp.experts.gate_up_proj` (E, 2F, D), `mlp.experts.down_proj` (E, D, F), i.e. (E, out, in)).
PEFT adapts such a parameter with one `lora_A.weight` (r E, in) and one `lora_B.weight`
(out, r E); expert e's delta is `scaling * B_e A_e` with A_e = lora_A rows [e r, (e + 1) r) and
B_e = the lora_B columns e, E + e, 2E + e, ... (peft's einsum "o r e, e r i -> e o i"). Ours
keep A (E, in, r) and B (E, r, out) per expert (`models/moe.expert_lora`).

Several targeted parameters of one module nest: peft wraps them in the module's definition
order (gate_up_proj, then down_proj), each wrapper around the previous one, so a parameter's
factors sit under `experts.` plus one `base_layer.` per targeted parameter defined after it.
PEFT's ParamWrapper has no dropout, DoRA or bias, so neither does the export.
"""
from __future__ import annotations

import numpy as np

from mllm_tune.tuning.api import MethodError

PARAM_ORDER = ("gate_up_proj", "down_proj")  # transformers' definition order
BASE_LAYER = ".base_layer"


def to_peft(a_EIR: np.ndarray, b_ERO: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Ours (E, in, r), (E, r, out) -> peft's lora_A (r E, in), lora_B (out, r E)."""
  e, d_in, r = a_EIR.shape
  lora_a = a_EIR.transpose(0, 2, 1).reshape(e * r, d_in)
  lora_b = b_ERO.transpose(2, 1, 0).reshape(b_ERO.shape[-1], r * e)
  return lora_a, lora_b


def from_peft(lora_a: np.ndarray, lora_b: np.ndarray, e: int) -> tuple[np.ndarray, np.ndarray]:
  """peft's lora_A (r E, in), lora_B (out, r E) -> ours (E, in, r), (E, r, out)."""
  r = lora_a.shape[0] // e
  a = lora_a.reshape(e, r, lora_a.shape[1]).transpose(0, 2, 1)
  b = lora_b.reshape(lora_b.shape[0], r, e).transpose(2, 1, 0)
  return a, b


def tensor_module(name: str, targeted: set[str]) -> str:
  """The module path of `name`'s (`...mlp.experts.gate_up_proj`) factors, given every targeted
  parameter name of the model."""
  module, param = name.rsplit(".", 1)
  later = PARAM_ORDER[PARAM_ORDER.index(param) + 1:]
  return module + BASE_LAYER * sum(f"{module}.{p}" in targeted for p in later)


def is_targeted(name: str, target_parameters) -> bool:
  """peft's rule: the full parameter name, or a `.`-suffix of it, is in `target_parameters`."""
  return any(name == t or name.endswith("." + t) for t in target_parameters)


def wrapped_modules(config: dict, names, where: str) -> dict[str, str]:
  """{module path as in the adapter's tensor keys: parameter name} for the model's expert
  parameter `names` that the adapter's `target_parameters` reach."""
  targets = config.get("target_parameters") or []
  if isinstance(targets, str):
    targets = [targets]
  targeted = {n for n in names if is_targeted(n, targets)}
  if targets and not targeted:
    have = (f"e.g. {sorted(names)[:2]}" if names else "this model has no mixture-of-experts "
            "layers; a Linear's weight is adapted through target_modules")
    raise MethodError(f"{where}: target_parameters {targets} match no mixture-of-experts "
                      f"parameter stack of this model ({have})")
  return {tensor_module(n, targeted): n for n in targeted}


def check_exportable(lora, names: list[str]) -> None:
  if names and lora.dropout:
    raise MethodError(f"PEFT export: LoRA on the expert stacks ({names[0]}, ...) with dropout "
                      f"{lora.dropout}; peft's target_parameters LoRA has no dropout (it merges "
                      "the delta into the stack). Export a run without dropout, or merge")
