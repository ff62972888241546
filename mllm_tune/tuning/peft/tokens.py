"""PEFT `TRAINABLE_TOKENS` export/import for `trainable_tokens` (docs/methods.md §2.9), alone or
beside LoRA (`LoraConfig(trainable_token_indices=...)`).

peft saves (keys after `base_model.model.`, adapter name removed):
  alone        `<embedding module>.trainable_tokens_delta` (n, D), config `token_indices`; with
               tied embeddings also `lm_head.trainable_tokens_delta`, the same rows (peft ties
               its head adapter to the embedding's)
  beside LoRA  `<embedding module>.token_adapter.trainable_tokens_delta` and the LoRA config's
               `trainable_token_indices` (a list, or {embedding module: list})
The "delta" is the rows themselves (peft replaces rows with `index_copy`), as our `token_rows`.
Import accepts the embedding's module name in every key layout of the model's family; a head
copy must equal the embedding rows, and rows on an untied LM head are refused (we train the
embedding's rows only).
"""
from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np

from mllm_tune import pytree
from mllm_tune.checkpoints.safetensors_io import CheckpointError
from mllm_tune.models.adapters import TOKEN_INDICES, TOKEN_ROWS
from mllm_tune.tuning.api import MethodError
from mllm_tune.tuning.peft import format as peft_io
from mllm_tune.tuning.selective.tokens import EMBEDDING, TrainableTokens

DELTA = "trainable_tokens_delta"
WRAPPED = "token_adapter." + DELTA  # the tensor's name beside LoRA
HEAD = "lm_head"
ROWS, IDS = f"llm/embed/{TOKEN_ROWS}", f"llm/embed/{TOKEN_INDICES}"


def _embedding_modules(cfg, layout_only: bool = False) -> list[str]:
  """The embedding's HF module name in the export layout (first), then in every other layout."""
  layouts = [peft_io.export_layout(cfg)]
  if not layout_only:
    layouts += [lay for lay in peft_io._layouts(cfg) if lay not in layouts]
  out = []
  for layout in layouts:
    for hf, path, _, _ in peft_io.tensor_rules(cfg, layout):
      if path == EMBEDDING and hf[:-len(".weight")] not in out:
        out.append(hf[:-len(".weight")])
  return out


def _rows_and_ids(variables: dict) -> tuple[np.ndarray, list[int]]:
  adapters = pytree.flatten(variables.get("adapters", {}))
  if ROWS not in adapters:
    raise MethodError("trainable_tokens export: the variables hold no token rows; were they "
                      "made by this method's init_variables?")
  return (np.asarray(adapters[ROWS], np.float32),
          [int(i) for i in np.asarray(adapters[IDS]).reshape(-1)])


def export_trainable_tokens(method: TrainableTokens, model, variables: dict):
  """-> (TRAINABLE_TOKENS adapter_config, tensors)."""
  del method
  cfg = model.config
  rows, ids = _rows_and_ids(variables)
  module = _embedding_modules(cfg, layout_only=True)[0]
  tensors = {f"{peft_io.PREFIX}{module}.{DELTA}": rows}
  if cfg.llm.tie_word_embeddings:  # peft's tied head adapter, saved beside (the same rows)
    tensors[f"{peft_io.PREFIX}{HEAD}.{DELTA}"] = rows
  config = {"peft_type": "TRAINABLE_TOKENS", "target_modules": module, "token_indices": ids,
            "init_weights": True}
  return config, tensors


def lora_extras(model, variables: dict) -> tuple[dict, dict]:
  """Beside a LoRA export: ({"trainable_token_indices": ids}, the wrapped rows' tensor)."""
  rows, ids = _rows_and_ids(variables)
  module = _embedding_modules(model.config, layout_only=True)[0]
  return ({"trainable_token_indices": ids},
          {f"{peft_io.PREFIX}{module}.{WRAPPED}": rows})


def _variables(method: TrainableTokens, model, params: dict, rows: np.ndarray, where: str,
               key: str) -> dict:
  variables = method.init_variables(None, params)
  flat = pytree.flatten(variables["adapters"])
  peft_io.check_shape(rows, tuple(np.shape(flat[ROWS])), key, where)
  flat[ROWS] = jnp.asarray(rows, jnp.float32)
  return {"params": params, "adapters": pytree.unflatten(flat)}


def _ids(value, cfg, where: str, field: str) -> list[int]:
  """peft's token-index field: a list, or {module name: list} naming the embedding."""
  if isinstance(value, dict):
    names = _embedding_modules(cfg)
    short = {n.rsplit(".", 1)[-1] for n in names}
    if len(value) != 1 or not any(k in names or k in short for k in value):
      raise MethodError(f"{os.path.join(where, peft_io.CONFIG_FILE)}: '{field}' = "
                        f"{json.dumps(value)} names modules other than the input embedding "
                        f"({names[0]}); only the input embedding's rows are trained here")
    value = next(iter(value.values()))
  if not isinstance(value, list) or not all(isinstance(i, int) for i in value):
    raise MethodError(f"{os.path.join(where, peft_io.CONFIG_FILE)}: '{field}' must be a list of "
                      f"token ids, got {json.dumps(value)}")
  return value


def import_trainable_tokens(config: dict, tensors: dict, model, params: dict, where: str):
  """peft TRAINABLE_TOKENS adapter -> (TrainableTokens, variables)."""
  cfg = model.config
  ids = _ids(config.get("token_indices"), cfg, where, "token_indices")
  method = TrainableTokens(token_indices=tuple(ids))
  embed, head = None, None
  names = _embedding_modules(cfg)
  for key, arr in sorted(tensors.items()):
    module, _ = peft_io.split_key(key, (DELTA,), where)
    if module in names:
      embed = (key, arr)
    elif module.rsplit(".", 1)[-1] == HEAD:
      head = (key, arr)
    else:
      raise MethodError(f"{where}: tensor '{key}' trains the rows of '{module}'; only the input "
                        f"embedding ({names[0]}) takes trainable tokens here")
  if embed is None:
    raise CheckpointError(f"{where}: no '{names[0]}.{DELTA}' tensor")
  if head is not None:
    if not cfg.llm.tie_word_embeddings:
      raise MethodError(f"{where}: tensor '{head[0]}' trains rows of an untied LM head; only the "
                        "input embedding's rows are trained here")
    if not np.array_equal(head[1], embed[1]):
      raise MethodError(f"{where}: tensor '{head[0]}' differs from '{embed[0]}', but the LM head "
                        "is tied to the embedding (they must hold the same rows)")
  return method, _variables(method, model, params, embed[1], where, embed[0])


def split_lora_tensors(config: dict, tensors: dict, model, params: dict, where: str):
  """A LoRA adapter's `trainable_token_indices` part -> (the other tensors, (TrainableTokens,
  its variables) or None)."""
  value = config.get("trainable_token_indices")
  mine = {k: v for k, v in tensors.items() if k.endswith("." + WRAPPED)}
  rest = {k: v for k, v in tensors.items() if k not in mine}
  if not value:
    if mine:
      raise MethodError(f"{where}: tensors {sorted(mine)[:2]} hold trainable tokens but "
                        "adapter_config.json has no 'trainable_token_indices'")
    return rest, None
  cfg = model.config
  method = TrainableTokens(token_indices=tuple(_ids(value, cfg, where,
                                                    "trainable_token_indices")))
  names = _embedding_modules(cfg)
  found = [(k, v) for k, v in mine.items()
           if peft_io.split_key(k, (WRAPPED,), where)[0] in names]
  if len(found) != 1 or len(mine) != 1:
    raise MethodError(f"{where}: expected one '{names[0]}.{WRAPPED}' tensor beside "
                      f"'trainable_token_indices', got {sorted(mine)}")
  key, rows = found[0]
  return rest, (method, _variables(method, model, params, rows, where, key))
