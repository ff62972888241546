"""PEFT export/import for the additive methods PEFT has (docs/methods.md §4.7), torch shapes:

  ia3            IA3              `P.ia3_l` [d_out, 1] (output scaling), [1, d_in] (feed-forward)
  prompt_tuning  PROMPT_TUNING    `prompt_embeddings` [n, D]
  prefix_tuning  PREFIX_TUNING    `prompt_embeddings` [n, 2 L t] (MLP output, viewed [n, 2L, K, H])
  llama_adapter  ADAPTION_PROMPT  `<attn>.adaption_prompt` [1, K, D], `<attn>.adaption_gate` [1]

`P = base_model.model.<HF module>`; `<attn>` is the HF `self_attn` module of a top layer. peft's
ADAPTION_PROMPT runs on llama/mistral models only: the export refuses every other model type
(multimodal ones included), whose directory peft would refuse to load.
A `tanh` gate is exported as its value `tanh(g)` (peft applies the raw gate). A prefix trained
through the MLP is exported as the MLP output; peft loads that for inference (peft cannot invert
the MLP to train on), and it imports here as plain `prefix_k/v` (`prefix_projection=False`).
"""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np

from mllm_tune.models.adapters import (ADAPTION_GATE, ADAPTION_PROMPT, IA3_IN, IA3_OUT, PREFIX_K,
                                       PREFIX_V, PROMPT_EMBEDDINGS)
from mllm_tune.tuning.peft import format as peft_io
from mllm_tune.models.prefix import split_prefix
from mllm_tune import pytree
from mllm_tune.tuning.additive.ia3 import IA3
from mllm_tune.tuning.additive.prompts import (ATTN, LlamaAdapter, PrefixTuning, PromptTuning,
                                               prefix_tensor)
from mllm_tune.tuning.api import MethodError
from mllm_tune.tuning.reparam.lora import adapter_path, get_leaf

PROMPT_KEY = PROMPT_EMBEDDINGS


def _llm_cfg(model):
  return model.config.llm


def _prompt_config(model, peft_type: str, n: int, token_dim: int, heads: int) -> dict:
  return {"peft_type": peft_type, "num_virtual_tokens": n, "token_dim": token_dim,
          "num_transformer_submodules": 1, "num_attention_heads": heads,
          "num_layers": _llm_cfg(model).num_layers, "modules_to_save": None}


def _need(tensors: dict, key: str, shape: tuple, where: str) -> np.ndarray:
  if key not in tensors:
    raise MethodError(f"{where}: tensor '{key}' is missing (found {sorted(tensors)[:5]})")
  peft_io.check_shape(tensors[key], shape, key, where)
  return tensors[key]


def _check_layers(config: dict, model, where: str) -> None:
  if int(config.get("num_layers", _llm_cfg(model).num_layers)) != _llm_cfg(model).num_layers:
    raise MethodError(f"{where}: adapter is for {config['num_layers']} layers, the model has "
                      f"{_llm_cfg(model).num_layers}")


# ----------------------------------------------------------------------------- IA3
def export_ia3(method: IA3, model, variables):
  adapters = variables["adapters"]
  tensors, targets, feedforward = {}, [], []
  for path, (flags, leaf) in sorted(method.resolve(variables["params"]).items()):
    scale = np.asarray(get_leaf(adapters, adapter_path(path, leaf)), np.float32)
    for i in (list(np.flatnonzero(flags)) if flags.ndim else [None]):
      name = peft_io.hf_module_name(model.config, path, i)
      targets.append(name)
      row = scale[i] if i is not None else scale
      if leaf == IA3_IN:
        feedforward.append(name)
        tensors[f"{peft_io.PREFIX}{name}.ia3_l"] = row[None, :]
      else:
        tensors[f"{peft_io.PREFIX}{name}.ia3_l"] = row[:, None]
  config = {"peft_type": "IA3", "target_modules": peft_io.targets_regex(targets),
            "feedforward_modules": peft_io.targets_regex(feedforward) if feedforward else [],
            "fan_in_fan_out": False, "init_ia3_weights": True, "modules_to_save": None}
  return config, tensors


def _is_feedforward(config: dict, module: str) -> bool:
  ff = config.get("feedforward_modules") or []
  if isinstance(ff, str):
    return re.fullmatch(ff, module) is not None
  return any(module == f or module.endswith("." + f) for f in ff)


def import_ia3(config, tensors, model, params, where):
  if config.get("fan_in_fan_out"):
    raise MethodError(f"{where}: IA3 with fan_in_fan_out is not supported")
  lookup = peft_io.module_lookup(model.config)
  found: dict[str, dict] = {}
  for key, arr in tensors.items():
    module, _ = peft_io.split_key(key, ("ia3_l",), where)
    if module not in lookup:
      raise MethodError(f"{where}: tensor '{key}' targets module '{module}', which this model "
                        "does not have")
    path, layer = lookup[module]
    *_, d_in, d_out = np.shape(get_leaf(params, path))
    ff = _is_feedforward(config, module)
    peft_io.check_shape(arr, (1, d_in) if ff else (d_out, 1), key, where)
    found.setdefault(path, {})[layer] = (arr.reshape(-1), ff)
  logical = lambda kind: tuple(sorted(peft_io.logical_target(p, i) for p, d in found.items()
                                      for i, (_, ff) in d.items() if ff in kind))
  ff_targets = logical((True,))
  method = IA3(targets=logical((True, False)), feedforward=ff_targets or r"(?!)")
  adapters = pytree.flatten(method.init(jax.random.key(0), params))
  for path, layers in found.items():
    leaf = adapter_path(path, IA3_IN if next(iter(layers.values()))[1] else IA3_OUT)
    value = np.array(adapters[leaf])
    for i, (row, _) in layers.items():
      value[i if i is not None else ...] = row
    adapters[leaf] = jnp.asarray(value)
  return method, {"params": params, "adapters": pytree.unflatten(adapters)}


def _check_positions(model, what: str) -> None:
  """peft runs virtual tokens through transformers in ways that leave an M-RoPE model
  (Qwen2/2.5/3-VL) unable to build its (t, h, w) positions: prompt tuning passes
  `inputs_embeds` without `input_ids` (measured: image tokens get text positions, logits differ);
  with prefix tuning's prefix attention mask transformers' rope index fails on an image prompt
  (an IndexError, 2026-12-06, transformers 5.25 / peft 0.21). Text-only prompts match ours."""
  if _llm_cfg(model).rope.mrope_section:
    raise MethodError(f"{what} cannot be exported for peft on this model (M-RoPE, "
                      f"{type(model.config).__name__}): peft passes its virtual tokens to "
                      "transformers in a form from which the model cannot compute the image "
                      "tokens' M-RoPE positions, so the adapter would give other logits than "
                      "ours on image inputs. Use the native checkpoint (mllm-tune export "
                      "--native, or mt.load_run).")


# ----------------------------------------------------------------------------- prompt tuning
def export_prompt_tuning(method: PromptTuning, model, variables):
  _check_positions(model, "prompt tuning")
  prompts = np.asarray(variables["adapters"]["llm"][PROMPT_EMBEDDINGS], np.float32)
  c = _llm_cfg(model)
  config = {**_prompt_config(model, "PROMPT_TUNING", prompts.shape[0], c.hidden_size,
                             c.num_heads),
            "prompt_tuning_init": "RANDOM", "prompt_tuning_init_text": None,
            "tokenizer_name_or_path": None, "tokenizer_kwargs": None}
  return config, {PROMPT_KEY: prompts}


def import_prompt_tuning(config, tensors, model, params, where):
  c = _llm_cfg(model)
  _check_layers(config, model, where)
  if int(config.get("num_transformer_submodules", 1)) != 1:
    raise MethodError(f"{where}: encoder-decoder prompts (num_transformer_submodules != 1) "
                      "do not apply to a decoder LLM")
  n = int(config["num_virtual_tokens"])
  prompts = _need(tensors, PROMPT_KEY, (n, c.hidden_size), where)
  method = PromptTuning(num_virtual_tokens=n)
  return method, {"params": params,
                  "adapters": {"llm": {PROMPT_EMBEDDINGS: jnp.asarray(prompts)}}}


# ----------------------------------------------------------------------------- prefix tuning
def export_prefix_tuning(method: PrefixTuning, model, variables):
  _check_positions(model, "prefix tuning")
  c = _llm_cfg(model)
  prefix = np.asarray(prefix_tensor(variables["adapters"]), np.float32)
  config = {**_prompt_config(model, "PREFIX_TUNING", prefix.shape[0],
                             c.num_kv_heads * c.head_dim, c.num_kv_heads),
            "encoder_hidden_size": method.encoder_hidden_size,
            "prefix_projection": method.prefix_projection, "init_weights": None}
  return config, {PROMPT_KEY: prefix}


def import_prefix_tuning(config, tensors, model, params, where):
  c = _llm_cfg(model)
  _check_layers(config, model, where)
  t = c.num_kv_heads * c.head_dim
  if int(config.get("token_dim", t)) != t or int(config.get("num_attention_heads",
                                                            c.num_kv_heads)) != c.num_kv_heads:
    raise MethodError(f"{where}: prefix has token_dim {config.get('token_dim')} / "
                      f"{config.get('num_attention_heads')} heads; this LLM's key/values are "
                      f"{c.num_kv_heads} heads x {c.head_dim} = {t}")
  n = int(config["num_virtual_tokens"])
  prefix = _need(tensors, PROMPT_KEY, (n, 2 * c.num_layers * t), where)
  k, v = split_prefix(jnp.asarray(prefix), c.num_layers)
  method = PrefixTuning(num_virtual_tokens=n, prefix_projection=False,
                        encoder_hidden_size=int(config.get("encoder_hidden_size", 512)))
  return method, {"params": params, "adapters": {"llm": {PREFIX_K: k, PREFIX_V: v}}}


# ----------------------------------------------------------------------------- LLaMA-Adapter
def attn_module_name(model, layer: int) -> str:
  """HF name of layer `layer`'s attention module (`...layers.3.self_attn`)."""
  return peft_io.hf_module_name(model.config, f"{ATTN}/q_proj/kernel", layer).rsplit(".", 1)[0]


PEFT_ADAPTION_TYPES = ("llama", "mistral")  # peft's ADAPTION_PROMPT model types (LLMs here)


def export_llama_adapter(method: LlamaAdapter, model, variables):
  from mllm_tune.models.config import config_to_hf
  kind = config_to_hf(model.config, "float32").get("model_type")
  if kind not in PEFT_ADAPTION_TYPES:  # PeftModel.from_pretrained would refuse the directory
    raise MethodError(f"llama_adapter cannot be exported for peft on model_type {kind!r}: "
                      f"peft's ADAPTION_PROMPT runs on {', '.join(PEFT_ADAPTION_TYPES)} models "
                      "only (PeftModel.from_pretrained refuses other types). Use the native "
                      "checkpoint (mllm-tune export --native, or mt.load_run).")
  attn = variables["adapters"]["llm"]["layers"]["attn"]
  prompt = np.asarray(attn[ADAPTION_PROMPT], np.float32)
  gate = np.asarray(attn[method.gate_leaf], np.float32)
  if method.gate_fn == "tanh":
    gate = np.tanh(gate)
  tensors = {}
  for i in np.flatnonzero(method.layer_flags(variables["params"])):
    key = f"{peft_io.PREFIX}{attn_module_name(model, int(i))}"
    tensors[f"{key}.adaption_prompt"] = prompt[i][None]
    tensors[f"{key}.adaption_gate"] = gate[i][None]
  config = {"peft_type": "ADAPTION_PROMPT", "adapter_len": method.adapter_len,
            "adapter_layers": method.adapter_layers, "target_modules": "self_attn"}
  return config, tensors


def import_llama_adapter(config, tensors, model, params, where):
  c = _llm_cfg(model)
  method = LlamaAdapter(adapter_len=int(config["adapter_len"]),
                        adapter_layers=int(config["adapter_layers"]))
  flags = method.layer_flags(params)
  prompt = np.zeros((c.num_layers, method.adapter_len, c.hidden_size), np.float32)
  gate = np.zeros((c.num_layers,), np.float32)
  expected = set()
  for i in np.flatnonzero(flags):
    key = f"{peft_io.PREFIX}{attn_module_name(model, int(i))}"
    expected |= {f"{key}.adaption_prompt", f"{key}.adaption_gate"}
    prompt[i] = _need(tensors, f"{key}.adaption_prompt", (1, method.adapter_len, c.hidden_size),
                      where)[0]
    gate[i] = _need(tensors, f"{key}.adaption_gate", (1,), where)[0]
  extra = sorted(set(tensors) - expected)
  if extra:
    raise MethodError(f"{where}: unexpected tensors {extra[:3]} (adapter_layers="
                      f"{method.adapter_layers} covers the top layers only)")
  adapters = pytree.unflatten({f"{ATTN}/{ADAPTION_PROMPT}": jnp.asarray(prompt),
                               f"{ATTN}/{ADAPTION_GATE}": jnp.asarray(gate)})
  return method, {"params": params, "adapters": adapters}
