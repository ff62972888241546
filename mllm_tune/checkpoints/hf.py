"""Hugging Face checkpoints in and out: `config.json` + (sharded) safetensors <-> params pytree.

Supports `LlavaForConditionalGeneration`, `LlavaNextForConditionalGeneration` and
`LlavaOnevisionForConditionalGeneration` (transformers >= 4.52 / 5.x key layout, and the older
`language_model.model.*` layout of llava-hf checkpoints, mapped as in Llava's
`_checkpoint_conversion_mapping`; the anyres models add `image_newline`),
`Qwen2VLForConditionalGeneration` / `Qwen2_5_VLForConditionalGeneration` (the hub layout, which
transformers 5 also writes, and its in-memory names: `QWEN_VL_LAYOUTS`),
`Qwen3VLForConditionalGeneration` (dense; its hub files and transformers 5 use the in-memory
names, `QWEN3_VL_LAYOUTS`) and bare
`LlamaForCausalLM` / `Qwen2ForCausalLM` / `MistralForCausalLM`. Loading streams tensor by tensor
from memory-mapped files and builds each parameter with `jax.make_array_from_callback`, so every
device reads only its own shard and no second host copy of the model is made. Writing streams the
same way, in the layout the checkpoint was read in. The key layouts and tensor rules are
`checkpoints.hf_rules` (re-exported here).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from mllm_tune.checkpoints.hf_rules import (  # noqa: F401 (re-exported)
    LLAVA_LAYOUTS, DEFAULT_LLAVA_LAYOUT, QWEN_VL_LAYOUTS, DEFAULT_QWEN_VL_LAYOUT,
    QWEN3_VL_LAYOUTS, MEMORY_LAYOUTS, TO_OURS, TO_HF, Rule, conv3d_kind, _lin, _norm, llm_rules,
    vision_rules, qwen_vision_rules, key_layouts, default_layout, memory_layout, layout_shapes,
    checkpoint_rules, expected_keys, _expand, _layers_of)
from mllm_tune.checkpoints.safetensors_io import (FLOAT_DTYPES, CheckpointError, SafetensorsFile,
                                                  write_safetensors)
from mllm_tune.models import build_model, param_shapes
from mllm_tune.models.config import (ConfigError, LlavaConfig, QwenVLConfig, config_from_hf,
                                     config_to_hf, with_runtime)

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# what a hub checkpoint ships beside its weights: copied by `save_pretrained(source_dir=)`
AUX_FILES = re.compile(r"(tokenizer.*|special_tokens_map\.json|vocab\.json|merges\.txt|"
                       r"added_tokens\.json|chat_template\.(json|jinja)|"
                       r"(video_)?preprocessor_config\.json|processor_config\.json|"
                       r"generation_config\.json|.*\.model)")



# ----------------------------------------------------------------------------- reading
def read_config_json(path: str) -> tuple[dict, str]:
  """(the parsed `config.json` of an HF model directory, its file path); clear errors for a
  missing file, malformed JSON (line and column) or a non-object."""
  cfg_file = os.path.join(path, "config.json")
  if not os.path.isfile(cfg_file):
    raise CheckpointError(f"{path}: no config.json (is this a Hugging Face model directory?)")
  try:
    with open(cfg_file) as f:
      d = json.load(f)
  except json.JSONDecodeError as e:
    raise ConfigError(f"{cfg_file}: malformed JSON at line {e.lineno} column {e.colno}: "
                      f"{e.msg}") from e
  if not isinstance(d, dict):
    raise ConfigError(f"{cfg_file}: expected a JSON object, got {type(d).__name__}")
  return d, cfg_file


GENERATION_FILE = "generation_config.json"


def read_generation_config(path: str) -> str:
  """The directory's `generation_config.json` as sorted JSON text ("" when absent): the
  defaults HF `generate` reads (eos / pad ids), carried on the model config so `mt.generate`
  uses them too. Malformed JSON names the file, line and column."""
  gen_file = os.path.join(path, GENERATION_FILE)
  if not os.path.isfile(gen_file):
    return ""
  try:
    with open(gen_file) as f:
      d = json.load(f)
  except json.JSONDecodeError as e:
    raise ConfigError(f"{gen_file}: malformed JSON at line {e.lineno} column {e.colno}: "
                      f"{e.msg}") from e
  if not isinstance(d, dict):
    raise ConfigError(f"{gen_file}: expected a JSON object, got {type(d).__name__}")
  for key in ("eos_token_id", "pad_token_id"):
    v = d.get(key)
    ok = v is None or (isinstance(v, int) and v >= 0) or (
        isinstance(v, list) and all(isinstance(i, int) and i >= 0 for i in v))
    if not ok:
      raise ConfigError(f"{gen_file}: '{key}' must be a token id or a list of them, got {v!r}")
  return json.dumps(d, sort_keys=True)


def read_config(path: str, dtype: str = "float32", param_dtype: str = "float32"):
  """Our config of an HF directory: `config.json`, with `generation_config.json` attached."""
  d, cfg_file = read_config_json(path)
  cfg = config_from_hf(d, cfg_file, dtype=dtype, param_dtype=param_dtype)
  gen = read_generation_config(path)
  if gen and "generation_json" in {f.name for f in dataclasses.fields(cfg)}:
    cfg = dataclasses.replace(cfg, generation_json=gen)
  return cfg


def open_checkpoint(path: str) -> dict[str, SafetensorsFile]:
  """Map every tensor name to its open file (single file or sharded with an index)."""
  index = os.path.join(path, INDEX_FILE)
  if os.path.isfile(index):
    try:
      with open(index) as f:
        weight_map = json.load(f)["weight_map"]
    except (json.JSONDecodeError, KeyError) as e:
      raise CheckpointError(f"{index}: malformed index file ({e!r})") from e
    files = {fn: SafetensorsFile(os.path.join(path, fn)) for fn in sorted(set(weight_map.values()))}
    for name, fn in weight_map.items():
      if name not in files[fn].keys():
        raise CheckpointError(f"{index}: tensor '{name}' is listed in {fn} but is not in it")
    return {name: files[fn] for name, fn in weight_map.items()}
  single = os.path.join(path, SINGLE_FILE)
  if os.path.isfile(single):
    f = SafetensorsFile(single)
    return {name: f for name in f.keys()}
  raise CheckpointError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE} found")


def detect_layout(path: str, cfg, names: set[str],
                  files: dict[str, SafetensorsFile] | None = None) -> str | None:
  """The LLaVA layout whose key set matches `names`, or a clear error naming what is off."""
  table = key_layouts(cfg)
  layouts = [None] if table is None else list(table)
  best = None
  for layout in layouts:
    want = expected_keys(cfg, layout)
    head = "lm_head.weight" if layout is None else table[layout][1] + ".weight"
    ignorable = {head} if cfg.llm.tie_word_embeddings else set()
    missing, unexpected = sorted(want - names), sorted(names - want - ignorable)
    shapes_fit = files is None or all(
        k in files and tuple(files[k].info(k)[0]) == shape
        for k, shape in layout_shapes(cfg, layout).items())
    if not missing and not unexpected and (shapes_fit or layout == layouts[-1]):
      return layout  # (the last candidate's tensor shapes are checked as they are read)
    if best is None or len(missing) + len(unexpected) < len(best[1]) + len(best[2]):
      best = (layout, missing, unexpected)
  layout, missing, unexpected = best
  msg = f"{path}: the checkpoint's tensors do not match its config.json"
  if layout:
    msg += f" (closest key layout: '{layout}')"
  if missing:
    msg += f"; {len(missing)} missing, e.g. {missing[:4]}"
  if unexpected:
    where = (lambda k: f"{k} (in {os.path.basename(files[k].path)})") if files else str
    msg += f"; {len(unexpected)} unexpected, e.g. {[where(k) for k in unexpected[:4]]}"
  raise CheckpointError(msg)


ShardingFn = Callable[[str, tuple[int, ...]], jax.sharding.Sharding]


def load_params(path: str, model, sharding_fn: ShardingFn | None = None) -> dict:
  """Read the weights of `path` into a params pytree matching `model` (see `load_pretrained`)."""
  tensors = open_checkpoint(path)
  layout = detect_layout(path, model.config, set(tensors), tensors)
  return _read_params(tensors, layout, model, sharding_fn)


def _read_params(tensors, layout, model, sharding_fn) -> dict:
  cfg = model.config
  shapes = param_shapes(model)
  rules = checkpoint_rules(cfg, layout)
  params: dict = {}
  for rule in rules:
    leaf = shapes
    for k in rule.path:
      leaf = leaf[k]
    per_layer_shape = tuple(leaf.shape[1:]) if rule.stacked else tuple(leaf.shape)
    names = _expand(rule, _layers_of(cfg, rule))
    views = []
    for orig in names:
      f = tensors[orig]
      shape, dt = f.info(orig)
      where = f"{os.path.basename(f.path)}: tensor '{orig}'"
      if dt not in FLOAT_DTYPES:
        raise CheckpointError(f"{where} has dtype {dt}; a floating dtype ({FLOAT_DTYPES}) "
                              "was expected")
      want = TO_HF[rule.kind](np.empty(per_layer_shape, np.bool_)).shape
      if tuple(shape) != want:
        raise CheckpointError(f"{where} has shape {list(shape)} but the config implies "
                              f"{list(want)}")
      views.append(TO_OURS[rule.kind](f.get(orig)))
    arr = _assemble(views, rule.stacked, leaf.shape, leaf.dtype,
                    sharding_fn("/".join(rule.path), leaf.shape) if sharding_fn else None)
    node = params
    for k in rule.path[:-1]:
      node = node.setdefault(k, {})
    node[rule.path[-1]] = arr
  return params


def _assemble(views: list[np.ndarray], stacked: bool, shape, dtype, sharding) -> jax.Array:
  """Build one parameter from per-layer views; each device reads only its slice."""
  def fetch(index):
    if not stacked:
      return np.asarray(views[0][index], dtype=dtype)
    rest = index[1:]
    layers = range(*index[0].indices(len(views)))
    return np.stack([np.asarray(views[i][rest], dtype=dtype) for i in layers])

  if sharding is None:
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.make_array_from_callback(tuple(shape), sharding, fetch)


def load_pretrained(path: str, dtype: str = "float32", param_dtype: str = "float32",
                    sharding_fn: ShardingFn | None = None, **config_overrides):
  """HF model directory -> `(model, params)`. `dtype` is the compute dtype, `param_dtype` the
  dtype weights are stored in (bf16/fp16 checkpoints are upcast exactly to float32 by default).
  `sharding_fn(path, shape) -> Sharding` places each parameter as it is read (see
  `mllm_tune.train.sharding.sharding_fn`). Extra keyword arguments override LLM/vision fields,
  e.g. `remat_policy="full"` (`models.config.with_runtime`)."""
  cfg = read_config(path, dtype=dtype, param_dtype=param_dtype)
  if config_overrides:
    cfg = with_runtime(cfg, **config_overrides)
  tensors = open_checkpoint(path)
  layout = detect_layout(path, cfg, set(tensors), tensors)
  if isinstance(cfg, (LlavaConfig, QwenVLConfig)):
    cfg = dataclasses.replace(cfg, hf_layout=layout)
  model = build_model(cfg)
  return model, _read_params(tensors, layout, model, sharding_fn)


# ----------------------------------------------------------------------------- writing
def _parse_size(size: int | str) -> int:
  if isinstance(size, int):
    return size
  m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B)\s*", size.upper())
  if not m:
    raise ValueError(f"max_shard_size '{size}' is not like '5GB' or '500MB'")
  return int(float(m.group(1)) * {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}[m.group(2)])


def save_pretrained(out_dir: str, model, params: dict, dtype: str | None = None,
                    max_shard_size: int | str = "5GB", source_dir: str | None = None,
                    layout: str | None = None) -> None:
  """Write `params` as a HF model directory that transformers loads.

  `dtype` of the written tensors defaults to the original checkpoint's dtype (config.json
  `dtype`/`torch_dtype`), else float32. The key `layout` (LLaVA, Qwen2-VL) defaults to the one
  the model was read in, else `default_layout`. `source_dir` copies
  tokenizer/processor files across.
  """
  cfg = model.config
  table = key_layouts(cfg)
  if table is not None:
    layout = layout or cfg.hf_layout or default_layout(cfg)
    if layout not in table:
      raise ValueError(f"layout '{layout}' unknown; choose from {sorted(table)}")
  orig = json.loads(cfg.hf_json) if cfg.hf_json else {}
  dtype = dtype or orig.get("dtype") or orig.get("torch_dtype") or "float32"
  np_dtype = {"float32": np.float32, "float16": np.float16, "bfloat16": jnp.bfloat16,
              "float64": np.float64}[dtype]
  os.makedirs(out_dir, exist_ok=True)
  specs = []
  for rule in checkpoint_rules(cfg, layout):
    leaf = params
    for k in rule.path:
      if k not in leaf:
        raise CheckpointError(f"params have no '{'/'.join(rule.path)}' (needed for {rule.hf})")
      leaf = leaf[k]
    for i, name in enumerate(_expand(rule, _layers_of(cfg, rule))):
      sub = leaf[i] if rule.stacked else leaf
      hf_shape = TO_HF[rule.kind](np.empty(sub.shape, np.bool_)).shape
      fetch = (lambda s=sub, kind=rule.kind: TO_HF[kind](np.asarray(jax.device_get(s))))
      specs.append((name, hf_shape, np.dtype(np_dtype), fetch))
  limit = _parse_size(max_shard_size)
  shards, current, size = [], [], 0
  for spec in specs:
    nbytes = int(np.prod(spec[1], dtype=np.int64)) * spec[2].itemsize
    if current and size + nbytes > limit:
      shards.append(current)
      current, size = [], 0
    current.append(spec)
    size += nbytes
  shards.append(current)
  for stale in os.listdir(out_dir):
    if re.fullmatch(r"model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?", stale):
      os.remove(os.path.join(out_dir, stale))
  if len(shards) == 1:
    write_safetensors(os.path.join(out_dir, SINGLE_FILE), shards[0])
  else:
    weight_map, total = {}, 0
    for k, shard in enumerate(shards):
      fn = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
      total += write_safetensors(os.path.join(out_dir, fn), shard)
      weight_map.update({s[0]: fn for s in shard})
    with open(os.path.join(out_dir, INDEX_FILE), "w") as f:
      json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(config_to_hf(cfg, dtype), f, indent=2, sort_keys=True)
  if getattr(cfg, "generation_json", ""):
    with open(os.path.join(out_dir, GENERATION_FILE), "w") as f:
      json.dump(json.loads(cfg.generation_json), f, indent=2, sort_keys=True)
  if source_dir:
    for fn in os.listdir(source_dir):
      if AUX_FILES.fullmatch(fn) and os.path.isfile(os.path.join(source_dir, fn)):
        shutil.copy2(os.path.join(source_dir, fn), os.path.join(out_dir, fn))
