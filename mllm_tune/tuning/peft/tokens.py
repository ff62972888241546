"""PEFT `TRAINABLE_TOKENS` export/import for `trainable_tokens` (docs/methods.md §2.9), alone or
beside LoRA (`LoraConfig(trainable_token_indices=...)`).

peft saves (keys after `base_model.model.`, adapter name removed):
  alone        `<embedding module>.trainable_tokens_delta` (n, D), config `token_indices`; with
               tied embeddings also `lm_head.trainable_tokens_delta`, the same rows (peft ties
               its head adapter to the embedding's)
  beside LoRA  `<embedding module>.token_adapter.trainable_tokens_delta` and the LoRA config's
               `trainable_token_indices` (a list, or {embedding module: list})
The "delta" is the rows themselves (peft replaces rows with `index_copy`), as our `token_rows`.
Import accepts the embedding's module name in every key layout of the model's family, peft's
dict form of the indices (keys matched as name suffixes; a tied head's entry with the same ids),
its base-weight copies (`save_embedding_layers`; checked equal to the base, skipped) and a tied
head's copy of the rows (checked equal); rows on an untied LM head or another module are
refused (we train the input embedding's rows only). Export refuses an embedding that is also
trained in full (modules_to_save), which peft does not load.
"""
from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np

from mllm_tune import pytree
from mllm_tune.checkpoints.hf import TO_HF
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
  out = [hf[:-len(".weight")] for hf, path, _, _ in
         peft_io.tensor_rules(cfg, peft_io.export_layout(cfg)) if path == EMBEDDING]
  if not layout_only:
    out += sorted({hf[:-len(".weight")] for hf, (path, _, _) in
                   peft_io.tensor_lookup(cfg).items() if path == EMBEDDING} - set(out))
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


def lora_extras(model, variables: dict, modules_to_save) -> tuple[dict, dict]:
  """Beside a LoRA export: ({"trainable_token_indices": ids}, the wrapped rows' tensor). An
  embedding also trained in full (`modules_to_save`) is refused: peft loads one or the other."""
  rows, ids = _rows_and_ids(variables)
  module = _embedding_modules(model.config, layout_only=True)[0]
  if module in (modules_to_save or []):
    raise MethodError(f"PEFT export: the embedding {module} is trained in full (modules_to_save) "
                      "and has trainable tokens; peft loads one or the other. Train the "
                      "embedding in full alone (its rows are in it), or only the tokens")
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
  """peft's token-index field: a list, or {module name: list} whose keys peft matches as name
  suffixes: the input embedding, and with tied embeddings the LM head with the same ids (peft
  ties that adapter to the embedding's)."""
  cfg_file = os.path.join(where, peft_io.CONFIG_FILE)
  if isinstance(value, dict):
    names = _embedding_modules(cfg)
    embed = [k for k in value if any(n.endswith(k) for n in names)]
    head = [k for k in value if k not in embed and HEAD.endswith(k.rsplit(".", 1)[-1])
            and cfg.llm.tie_word_embeddings and value[k] == value.get(embed[0] if embed else "")]
    if len(embed) != 1 or set(value) != set(embed) | set(head):
      raise MethodError(f"{cfg_file}: '{field}' = {json.dumps(value)} names modules other than "
                        f"the input embedding ({names[0]}) and its tied LM head; only the input "
                        "embedding's rows are trained here")
    value = value[embed[0]]
  if not isinstance(value, list) or not all(isinstance(i, int) for i in value):
    raise MethodError(f"{cfg_file}: '{field}' must be a list of token ids, got "
                      f"{json.dumps(value)}")
  return value


def _base_copy(key: str, arr: np.ndarray, model, params: dict, where: str) -> bool:
  """Whether `key` is peft's copy of a base weight (`<module>[.token_adapter].base_layer.weight`,
  with `save_embedding_layers`): checked equal to this base (a tied head's to the embedding)."""
  name = key[len(peft_io.PREFIX):] if key.startswith(peft_io.PREFIX) else key
  if not name.endswith(".base_layer.weight"):
    return False
  hf = name.replace(".token_adapter.", ".").replace(".base_layer.", ".")
  lookup = peft_io.tensor_lookup(model.config)
  if hf in lookup:
    path, layer, kind = lookup[hf]
    base = pytree.flatten(params)[path]
    base = TO_HF[kind](np.asarray(base if layer is None else base[layer], np.float32))
  elif hf.rsplit(".", 2)[-2] == HEAD and model.config.llm.tie_word_embeddings:
    base = np.asarray(pytree.flatten(params)[EMBEDDING], np.float32)
  else:
    raise MethodError(f"{where}: tensor '{key}' copies '{hf}', which this model does not have")
  if np.shape(arr) != np.shape(base) or not np.array_equal(np.asarray(arr, np.float32), base):
    raise MethodError(f"{where}: tensor '{key}' is peft's copy of the base weight '{hf}', but it "
                      "differs from this base model's: the adapter was saved from another base")
  return True


def _rows_of(found: dict, cfg, names: list[str], where: str, suffix: str):
  """(key, rows) of the embedding's tensor among `found` {module: (key, rows)}; a tied head's
  copy must hold the same rows, an untied head's is refused."""
  embed = [m for m in found if m in names]
  if len(embed) != 1:
    raise CheckpointError(f"{where}: expected one '{names[0]}.{suffix}' tensor, got "
                          f"{sorted(k for k, _ in found.values())}")
  key, rows = found[embed[0]]
  for module, (k, other) in found.items():
    if module == embed[0]:
      continue
    if module.rsplit(".", 1)[-1] != HEAD:
      raise MethodError(f"{where}: tensor '{k}' trains the rows of '{module}'; only the input "
                        f"embedding ({names[0]}) takes trainable tokens here")
    if not cfg.llm.tie_word_embeddings:
      raise MethodError(f"{where}: tensor '{k}' trains rows of an untied LM head; only the "
                        "input embedding's rows are trained here")
    if not np.array_equal(other, rows):
      raise MethodError(f"{where}: tensor '{k}' differs from '{key}', but the LM head is tied "
                        "to the embedding (they must hold the same rows)")
  return key, rows


def import_trainable_tokens(config: dict, tensors: dict, model, params: dict, where: str):
  """peft TRAINABLE_TOKENS adapter -> (TrainableTokens, variables)."""
  cfg = model.config
  method = TrainableTokens(token_indices=tuple(_ids(config.get("token_indices"), cfg, where,
                                                    "token_indices")))
  found = {}
  for key, arr in sorted(tensors.items()):
    if _base_copy(key, arr, model, params, where):
      continue
    module, _ = peft_io.split_key(key, (DELTA,), where)
    found[module] = (key, arr)
  key, rows = _rows_of(found, cfg, _embedding_modules(cfg), where, DELTA)
  return method, _variables(method, model, params, rows, where, key)


def split_lora_tensors(config: dict, tensors: dict, model, params: dict, where: str):
  """A LoRA adapter's `trainable_token_indices` part -> (the other tensors, (TrainableTokens,
  its variables) or None)."""
  value = config.get("trainable_token_indices")
  mine = {k: v for k, v in tensors.items() if ".token_adapter." in k}
  rest = {k: v for k, v in tensors.items() if k not in mine}
  if not value:
    if mine:
      raise MethodError(f"{where}: tensors {sorted(mine)[:2]} hold trainable tokens but "
                        "adapter_config.json has no 'trainable_token_indices'")
    return rest, None
  cfg = model.config
  method = TrainableTokens(token_indices=tuple(_ids(value, cfg, where,
                                                    "trainable_token_indices")))
  found = {}
  for key, arr in sorted(mine.items()):
    if not _base_copy(key, arr, model, params, where):
      found[peft_io.split_key(key, (WRAPPED,), where)[0]] = (key, arr)
  # peft's copy of a tied head's base weight sits outside the token adapter
  for key in [k for k in rest if k.endswith(f"{HEAD}.base_layer.weight")]:
    if cfg.llm.tie_word_embeddings and _base_copy(key, rest[key], model, params, where):
      del rest[key]
  key, rows = _rows_of(found, cfg, _embedding_modules(cfg), where, WRAPPED)
  return rest, (method, _variables(method, model, params, rows, where, key))
