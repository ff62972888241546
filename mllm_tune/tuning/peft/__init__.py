"""PEFT interop: `export_peft` / `import_peft` and the per-method tensor mappings.

| module         | methods (registry name -> PEFT `peft_type`)                                  |
|----------------|-------------------------------------------------------------------------------|
| `format.py`    | adapter_config.json + adapter_model.safetensors, HF module names, shape checks |
| `lora.py`      | lora, rslora, dora, pissa, lorasculpt -> LORA (also composed with freeze /    |
|                | bitfit / ln_tuning: `extras.py` maps modules_to_save and bias=)               |
| `vera.py`      | vera -> VERA                                                                  |
| `ln_tuning.py` | ln_tuning -> LN_TUNING                                                        |
| `tokens.py`    | trainable_tokens -> TRAINABLE_TOKENS (beside LoRA: trainable_token_indices)   |
| `additive.py`  | ia3 -> IA3, prompt_tuning, prefix_tuning, llama_adapter -> ADAPTION_PROMPT    |

The tables below are the only place a mapping is registered.
"""
from __future__ import annotations

import os

from mllm_tune.tuning.api import Compose, Method, MethodError
from mllm_tune.tuning.peft import additive, ln_tuning, lora, tokens, vera
from mllm_tune.tuning.peft.format import CONFIG_FILE, read_adapter, write_adapter

# EXPORTERS[method name](method, model, variables) -> (adapter_config dict, tensors)
EXPORTERS = {
    "lora": lora.export_lora, "rslora": lora.export_lora, "dora": lora.export_lora,
    "pissa": lora.export_lora, "lorasculpt": lora.export_lora,
    "vera": vera.export_vera,
    "ln_tuning": ln_tuning.export_ln_tuning,
    "trainable_tokens": tokens.export_trainable_tokens,
    "ia3": additive.export_ia3, "prompt_tuning": additive.export_prompt_tuning,
    "prefix_tuning": additive.export_prefix_tuning,
    "llama_adapter": additive.export_llama_adapter,
}
# IMPORTERS[peft_type](config, tensors, model, params, path) -> (method, variables)
IMPORTERS = {
    "LORA": lora.import_lora,
    "VERA": vera.import_vera,
    "LN_TUNING": ln_tuning.import_ln_tuning,
    "TRAINABLE_TOKENS": tokens.import_trainable_tokens,
    "IA3": additive.import_ia3, "PROMPT_TUNING": additive.import_prompt_tuning,
    "PREFIX_TUNING": additive.import_prefix_tuning,
    "ADAPTION_PROMPT": additive.import_llama_adapter,
}


def peft_adapter(model, method: Method, variables: dict,
                 base_model_name_or_path: str = "") -> tuple[dict, dict]:
  """`method`'s adapters as PEFT's (adapter_config dict, tensors), nothing written; refused for
  methods PEFT does not have. A composition goes out as LoRA with modules_to_save / bias=
  (`extras.py`) when it has one LoRA-family member and the others train base params in place."""
  if isinstance(method, Compose):
    config, tensors = lora.export_lora(method, model, variables)
  elif method.name not in EXPORTERS:
    instead = ("the merged model (mllm-tune export --merged) or the native checkpoint"
               if method.mergeable else "the native checkpoint (mllm-tune export --native): "
               "its modules cannot be folded into the base weights either")
    raise MethodError(f"method '{method.name or type(method).__name__}' has no PEFT "
                      f"counterpart (PEFT export exists for {sorted(EXPORTERS)}); use {instead}")
  else:
    config, tensors = EXPORTERS[method.name](method, model, variables)
  config = {"task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
            "inference_mode": True, "revision": None, **config}
  return config, tensors


def export_peft(out_dir: str, model, method: Method, variables: dict,
                base_model_name_or_path: str = "") -> None:
  """Write `method`'s adapters in PEFT format (`peft_adapter`) to `out_dir`."""
  write_adapter(out_dir, *peft_adapter(model, method, variables, base_model_name_or_path))


def import_peft(path: str, model, params: dict) -> tuple[Method, dict]:
  """Read a PEFT adapter directory -> (method, variables) for `model` with base `params`."""
  config, tensors = read_adapter(path)
  peft_type = config.get("peft_type")
  if peft_type not in IMPORTERS:
    raise MethodError(f"{os.path.join(path, CONFIG_FILE)}: peft_type {peft_type!r} is not "
                      f"supported (supported: {sorted(IMPORTERS)})")
  return IMPORTERS[peft_type](config, tensors, model, params, path)

