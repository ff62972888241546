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
same way, in the layout the checkpoint was read in.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mllm_tune.checkpoints.safetensors_io import (FLOAT_DTYPES, CheckpointError, SafetensorsFile,
                                                  write_safetensors)
from mllm_tune.models import build_model, param_shapes
from mllm_tune.models.config import (CausalLMConfig, ConfigError, LlavaConfig, QwenVLConfig,
                                     config_from_hf, config_to_hf, with_runtime)

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Key layouts of LlavaForConditionalGeneration checkpoints seen in the wild:
#   legacy:   llava-hf checkpoints written by transformers < 4.52
#   v5:       transformers >= 4.52 module names (`model.language_model.*`, `lm_head`)
#   v5_saved: what transformers 5.x `save_pretrained` writes (reverse conversion mapping, and
#             CLIPVisionModel/SiglipVisionModel without their `vision_model.` prefix)
#   v5_flat:  transformers 5.x in-memory names
# A checkpoint is read in whichever layout matches its keys exactly and written back in the same.
LLAVA_LAYOUTS = {
    "legacy": ("language_model.model.", "language_model.lm_head", "vision_tower.vision_model.",
               "multi_modal_projector."),
    "v5": ("model.language_model.", "lm_head", "model.vision_tower.vision_model.",
           "model.multi_modal_projector."),
    "v5_saved": ("language_model.model.", "language_model.lm_head", "vision_tower.",
                 "multi_modal_projector."),
    "v5_flat": ("model.language_model.", "lm_head", "model.vision_tower.",
                "model.multi_modal_projector."),
}
DEFAULT_LLAVA_LAYOUT = "v5"
# Qwen2-VL / Qwen2.5-VL (LLM prefix, LM head, vision prefix; the merger is `<vision>merger.`):
#   hub: the hub's names, which transformers 5 `save_pretrained` also writes
#   v5:  transformers 5 in-memory names (`conversion_mapping.py`, Qwen2VLForConditionalGeneration)
QWEN_VL_LAYOUTS = {
    "hub": ("model.", "lm_head", "visual."),
    "v5": ("model.language_model.", "lm_head", "model.visual."),
}
DEFAULT_QWEN_VL_LAYOUT = "hub"
QWEN3_VL_LAYOUTS = {"v5": QWEN_VL_LAYOUTS["v5"]}  # Qwen3-VL's hub files and transformers 5
# module names inside the transformers 5 model (what peft adapter files name)
MEMORY_LAYOUTS = {LlavaConfig: "v5_flat", QwenVLConfig: "v5"}
AUX_FILES = re.compile(r"(tokenizer.*|special_tokens_map\.json|vocab\.json|merges\.txt|"
                       r"added_tokens\.json|chat_template\.(json|jinja)|preprocessor_config\.json|"
                       r"processor_config\.json|generation_config\.json|.*\.model)")



class _Transforms(dict):
  """kind -> transform; parameterised kinds `conv3d:CxTxPxP` are built on first use."""

  def __init__(self, table: dict, conv3d: Callable):
    super().__init__(table)
    self._conv3d = conv3d

  def __missing__(self, kind: str):
    name, _, dims = kind.partition(":")
    if name != "conv3d" or not dims:
      raise KeyError(kind)
    fn = self[kind] = self._conv3d(tuple(int(x) for x in dims.split("x")))
    return fn


def conv3d_kind(channels: int, temporal: int, patch: int) -> str:
  """The transform kind of a Conv3d patch embedding whose kernel equals its stride:
  HF (D, C, T, p, p) <-> ours (C*T*p*p, D)."""
  return f"conv3d:{channels}x{temporal}x{patch}x{patch}"


# Layout transforms, HF tensor -> ours (and back).
TO_OURS = _Transforms({"copy": lambda x: x, "linear": lambda x: x.T,
                       "patch": lambda x: x.transpose(2, 3, 1, 0)},  # (D, C, P, P) -> (P, P, C, D)
                      lambda dims: lambda x: x.reshape(x.shape[0], -1).T)
TO_HF = _Transforms({"copy": lambda x: x, "linear": lambda x: x.T,
                     "patch": lambda x: x.transpose(3, 2, 0, 1)},
                    lambda dims: lambda x: x.T.reshape((x.shape[1],) + dims))


class Rule(NamedTuple):
  """One HF tensor family: `hf` may hold `{i}` (layer index) when `stacked`."""
  hf: str
  path: tuple[str, ...]
  kind: str = "copy"
  stacked: bool = False


def _lin(hf: str, path: tuple, bias: bool, stacked: bool) -> list[Rule]:
  out = [Rule(f"{hf}.weight", path + ("kernel",), "linear", stacked)]
  if bias:
    out.append(Rule(f"{hf}.bias", path + ("bias",), "copy", stacked))
  return out


def _norm(hf: str, path: tuple, stacked: bool, bias: bool) -> list[Rule]:
  out = [Rule(f"{hf}.weight", path + ("scale",), "copy", stacked)]
  if bias:
    out.append(Rule(f"{hf}.bias", path + ("bias",), "copy", stacked))
  return out


def llm_rules(c, prefix: str, head: str = "lm_head") -> list[Rule]:
  """Rules for the decoder under `prefix` (e.g. `model.language_model.`), LM head at `head`."""
  p, lp, s = prefix, ("llm", "layers"), True
  rules = [Rule(f"{p}embed_tokens.weight", ("llm", "embed", "embedding"))]
  for n in "qkvo":
    rules += _lin(f"{p}layers.{{i}}.self_attn.{n}_proj", lp + ("attn", f"{n}_proj"),
                  c.o_bias if n == "o" else c.qkv_bias, s)
  for n in ("gate", "up", "down"):
    rules += _lin(f"{p}layers.{{i}}.mlp.{n}_proj", lp + ("mlp", f"{n}_proj"), c.mlp_bias, s)
  if c.qk_norm:  # Qwen3
    for n in "qk":
      rules += _norm(f"{p}layers.{{i}}.self_attn.{n}_norm", lp + ("attn", f"{n}_norm"), s, False)
  rules += _norm(f"{p}layers.{{i}}.input_layernorm", lp + ("input_norm",), s, False)
  rules += _norm(f"{p}layers.{{i}}.post_attention_layernorm", lp + ("post_attn_norm",), s, False)
  rules += _norm(f"{p}norm", ("llm", "final_norm"), False, False)
  if not c.tie_word_embeddings:
    rules += _lin(head, ("llm", "lm_head"), False, False)
  return rules


def vision_rules(c, prefix: str) -> list[Rule]:
  p, vp, s = prefix, ("vision", "layers"), True
  e = f"{p}embeddings."
  rules = [Rule(f"{e}patch_embedding.weight", ("vision", "embed", "patch_kernel"), "patch"),
           Rule(f"{e}position_embedding.weight", ("vision", "embed", "position_embedding"))]
  if c.is_clip:
    rules += [Rule(f"{e}class_embedding", ("vision", "embed", "class_embedding"))]
    rules += _norm(f"{p}pre_layrnorm", ("vision", "pre_norm"), False, True)
  else:
    rules += [Rule(f"{e}patch_embedding.bias", ("vision", "embed", "patch_bias"))]
  enc = f"{p}encoder.layers.{{i}}."
  for n in ("q", "k", "v", "out"):
    rules += _lin(f"{enc}self_attn.{n}_proj", vp + ("attn", f"{n}_proj"), True, s)
  for n in ("1", "2"):
    rules += _norm(f"{enc}layer_norm{n}", vp + (f"norm{n}",), s, True)
    rules += _lin(f"{enc}mlp.fc{n}", vp + ("mlp", f"fc{n}"), True, s)
  rules += _norm(f"{p}post_layernorm", ("vision", "post_norm"), False, True)
  if c.use_head:
    h, hp = f"{p}head.", ("vision", "head")
    rules += [Rule(f"{h}probe", hp + ("probe",)),
              Rule(f"{h}attention.in_proj_weight", hp + ("in_proj_kernel",), "linear"),
              Rule(f"{h}attention.in_proj_bias", hp + ("in_proj_bias",))]
    rules += _lin(f"{h}attention.out_proj", hp + ("out_proj",), True, False)
    rules += _norm(f"{h}layernorm", hp + ("layernorm",), False, True)
    rules += _lin(f"{h}mlp.fc1", hp + ("mlp", "fc1"), True, False)
    rules += _lin(f"{h}mlp.fc2", hp + ("mlp", "fc2"), True, False)
  return rules


def qwen_vision_rules(c, prefix: str) -> list[Rule]:
  """The Qwen2-VL / 2.5-VL / 3-VL tower under `vision/` and its merger(s) under `projector/`."""
  vp, s = ("vision", "layers"), True
  rules = [Rule(f"{prefix}patch_embed.proj.weight", ("vision", "patch_embed", "kernel"),
                conv3d_kind(c.num_channels, c.temporal_patch_size, c.patch_size))]
  if c.qwen3:
    rules += [Rule(f"{prefix}patch_embed.proj.bias", ("vision", "patch_embed", "bias")),
              Rule(f"{prefix}pos_embed.weight", ("vision", "pos_embed"))]
  blk = f"{prefix}blocks.{{i}}."
  for n in ("1", "2"):
    rules += _norm(f"{blk}norm{n}", vp + (f"norm{n}",), s, not c.windowed)
  rules += _lin(f"{blk}attn.qkv", vp + ("attn", "qkv"), True, s)
  rules += _lin(f"{blk}attn.proj", vp + ("attn", "proj"), True, s)
  for n in ("gate_proj", "up_proj", "down_proj") if c.windowed else ("fc1", "fc2"):
    rules += _lin(f"{blk}mlp.{'linear_' if c.qwen3 else ''}{n}", vp + ("mlp", n), True, s)
  mergers = [(f"{prefix}merger.", ("projector",))] + [
      (f"{prefix}deepstack_merger_list.{i}.", ("projector", f"deepstack_{i}"))
      for i in range(len(c.deepstack_visual_indexes))]
  for m, mp in mergers:  # Qwen3-VL: norm, linear_fc1, linear_fc2; else ln_q, mlp.0, mlp.2
    names = ("norm", "linear_fc1", "linear_fc2") if c.qwen3 else ("ln_q", "mlp.0", "mlp.2")
    rules += _norm(f"{m}{names[0]}", mp + ("ln_q",), False, not c.windowed)
    rules += _lin(f"{m}{names[1]}", mp + ("linear_1",), True, False)
    rules += _lin(f"{m}{names[2]}", mp + ("linear_2",), True, False)
  return rules


def key_layouts(cfg) -> dict | None:
  """The key layouts a config's checkpoints come in (None: a bare LLM's single layout)."""
  if isinstance(cfg, QwenVLConfig):
    return QWEN3_VL_LAYOUTS if cfg.vision.qwen3 else QWEN_VL_LAYOUTS
  return LLAVA_LAYOUTS if isinstance(cfg, LlavaConfig) else None


def default_layout(cfg) -> str:
  """The key layout written when none was read: 'v5' (LLaVA, Qwen3-VL), 'hub' (Qwen2-VL)."""
  if isinstance(cfg, QwenVLConfig):
    return "v5" if cfg.vision.qwen3 else DEFAULT_QWEN_VL_LAYOUT
  return DEFAULT_LLAVA_LAYOUT


def memory_layout(cfg) -> str | None:
  """The layout of module names inside the transformers 5 model (peft files use them)."""
  return MEMORY_LAYOUTS.get(type(cfg))


def checkpoint_rules(cfg, layout: str | None = None) -> list[Rule]:
  """All tensor rules of a config; `layout` picks the key layout (`key_layouts`)."""
  if isinstance(cfg, CausalLMConfig):
    return llm_rules(cfg.llm, "model.")
  if isinstance(cfg, QwenVLConfig):
    llm_p, head, vis_p = QWEN_VL_LAYOUTS[layout or default_layout(cfg)]
    return llm_rules(cfg.llm, llm_p, head) + qwen_vision_rules(cfg.vision, vis_p)
  llm_p, head, vis_p, proj_p = LLAVA_LAYOUTS[layout or DEFAULT_LLAVA_LAYOUT]
  rules = llm_rules(cfg.llm, llm_p, head)
  rules += vision_rules(cfg.vision, vis_p)
  for n in ("1", "2") if cfg.projector_type == "mlp2x_gelu" else ("1",):
    rules += _lin(f"{proj_p}linear_{n}", ("projector", f"linear_{n}"), cfg.projector_bias, False)
  if cfg.anyres:  # LLaVA-NeXT / OneVision: beside the projector, `model.` in the v5 layouts
    rules.append(Rule(f"{proj_p[:-len('multi_modal_projector.')]}image_newline",
                      ("image_newline",)))
  return rules


def expected_keys(cfg, layout: str | None) -> set[str]:
  return {k for r in checkpoint_rules(cfg, layout) for k in _expand(r, _layers_of(cfg, r))}


def _expand(rule: Rule, num_layers: int) -> list[str]:
  return [rule.hf.format(i=i) for i in range(num_layers)] if rule.stacked else [rule.hf]


def _layers_of(cfg, rule: Rule) -> int:
  return cfg.vision.num_layers if rule.path[0] == "vision" else cfg.llm.num_layers


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
    if not missing and not unexpected:
      return layout
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
