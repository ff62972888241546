"""ml_collections configs from Python files, with `--config.a.b=value` overrides and validation.

    cfg = load_config("configs/experiments/tiny_lora.py")        # or "file.py:arg"
    apply_overrides(cfg, ["config.method.rank=8", "config.train.steps=100"])

Unknown keys and values of the wrong type are rejected with the key named (and the closest
existing key suggested). One exception: eval sets are added on the command line, field by field
(`--config.eval.target.NAME.kind=llava_json --config.eval.target.NAME.json_path=...`): a new
name under `eval.target` / `eval.retention` starts from `eval_set()`'s defaults.

Config files live anywhere. The configs shipped with the package (`mllm_tune/configs/`) import
as `mllm_tune.configs...` everywhere, and as `configs...` in a file `load_config` runs: from a
clone (its `configs/` folder of thin copies, found above the file) or, when no `configs` package
is importable, from the package's own files. A path `configs/...` that does not exist in the
working directory is read from the package (`mllm-tune train --config
configs/experiments/llava_lora.py` works from any directory)."""
from __future__ import annotations

import ast
import difflib
import importlib.util
import os
import sys

import ml_collections

from mllm_tune import penalties


class ConfigError(ValueError):
  """Bad config file, unknown key or ill-typed value."""


# where the package's configs are (mllm_tune/configs; a location, not an import: the configs
# sit above this layer)
PACKAGE_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               "configs")
EVAL_SET_DEFAULTS = dict(kind="offline", source="", num=0, metric="vqa", split="eval",
                         json_path="", image_folder="", seed=0)
EVAL_ROLES = ("target", "retention")


def eval_set(kind: str = "offline", source: str = "", num: int = 0, metric: str = "vqa",
             split: str = "eval", json_path: str = "", image_folder: str = "", seed: int = 0):
  """One target / retention set: `offline` (an `offline_vqa` source: digits, general, a family
  name; `split`, `seed`) or `llava_json` / `tfds` (json_path, image_folder; the reference answer
  is each record's last gpt turn); the first `num` records (0 = all)."""
  if kind in ("llava_json", "tfds") and source:
    raise ValueError(f"eval_set(kind={kind!r}, source={source!r}): `source` names an offline "
                     f"benchmark source (digits, general, a family); a {kind} set reads "
                     "json_path= (and image_folder=)")
  return ml_collections.ConfigDict(dict(kind=kind, source=source, num=num, metric=metric,
                                        split=split, json_path=json_path,
                                        image_folder=image_folder, seed=seed))


def _add_repo_root(path: str) -> None:
  d = os.path.dirname(os.path.abspath(path))
  while d != os.path.dirname(d):
    if os.path.isdir(os.path.join(d, "configs")) and os.path.isfile(
        os.path.join(d, "configs", "__init__.py")):
      if d not in sys.path:
        sys.path.insert(0, d)
      return
    d = os.path.dirname(d)


def _packaged(path: str) -> str | None:
  """`configs/...` -> the package's file of that name, if it exists."""
  parts = os.path.normpath(path).split(os.sep)
  if parts[0] != "configs" or len(parts) < 2:
    return None
  candidate = os.path.join(PACKAGE_CONFIGS, *parts[1:])
  return candidate if os.path.isfile(candidate) else None


def _configs_importable() -> None:
  """Make `import configs...` work in a config file outside a clone: when no `configs` package
  can be found, `configs` is the package's config folder (the same files as mllm_tune.configs)."""
  if "configs" in sys.modules or importlib.util.find_spec("configs") is not None:
    return
  spec = importlib.util.spec_from_file_location(
      "configs", os.path.join(PACKAGE_CONFIGS, "__init__.py"),
      submodule_search_locations=[PACKAGE_CONFIGS])
  module = importlib.util.module_from_spec(spec)
  sys.modules["configs"] = module
  spec.loader.exec_module(module)


def load_config(spec: str) -> ml_collections.ConfigDict:
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    path = _packaged(path) or path
  if not os.path.isfile(path):
    raise ConfigError(f"config file '{path}' does not exist")
  _add_repo_root(path)
  _configs_importable()
  mod_spec = importlib.util.spec_from_file_location(f"_mllm_cfg_{abs(hash(path))}", path)
  module = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"{path}: no get_config() function")
  cfg = module.get_config(arg) if arg else module.get_config()
  if not isinstance(cfg, ml_collections.ConfigDict):
    raise ConfigError(f"{path}: get_config() must return an ml_collections.ConfigDict")
  return cfg


def _parse(raw: str, current):
  if isinstance(current, bool):
    low = raw.lower()
    if low in ("true", "1", "yes"):
      return True
    if low in ("false", "0", "no"):
      return False
    raise ValueError(f"expected a boolean, got {raw!r}")
  if isinstance(current, str):
    return raw
  try:
    value = ast.literal_eval(raw)
  except (ValueError, SyntaxError):
    value = raw
  if isinstance(current, tuple) and isinstance(value, (str, list)):
    value = tuple(value) if isinstance(value, list) else tuple(raw.split(","))
  elif isinstance(current, tuple) and isinstance(value, (int, float)):
    # a one-value sequence (posthoc.sweep=0.5), as text where the sequence holds text
    value = (raw,) if current and isinstance(current[0], str) else (value,)
  if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
    value = float(value)
  return value


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: list[str]) -> None:
  for item in overrides:
    key, sep, raw = item.partition("=")
    if not sep:
      raise ConfigError(f"override '{item}' must look like config.a.b=value")
    parts = key.split(".")
    if parts[0] == "config":
      parts = parts[1:]
    node = cfg
    _add_eval_set(cfg, parts)
    for i, part in enumerate(parts):
      keys = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
      if part not in keys:
        where = ".".join(parts[:i]) or "<root>"
        close = difflib.get_close_matches(part, keys, n=3)
        raise ConfigError(f"unknown config key '{'.'.join(parts)}': '{part}' is not a field of "
                          f"{where}" + (f" (did you mean {close}?)" if close else
                                        f" (fields: {sorted(keys)})"))
      if i < len(parts) - 1:
        node = node[part]
    current = node[parts[-1]]
    if current is None:  # a typed FieldReference(None): parse as its type ("None" keeps it)
      ftype = node.get_ref(parts[-1]).get_type()
      if raw in ("None", "none"):
        node[parts[-1]] = None
        continue
      current = ftype() if ftype in (bool, int, float, str) else None
    try:
      value = _parse(raw, current)
      node[parts[-1]] = value
    except (TypeError, ValueError) as e:
      raise ConfigError(f"config key '{'.'.join(parts)}': cannot set {raw!r} on a field of type "
                        f"{type(current).__name__} ({e})") from e


def _add_eval_set(cfg: ml_collections.ConfigDict, parts: list[str]) -> None:
  """`eval.target.NAME.FIELD` / `eval.retention.NAME.FIELD` with a new NAME: add the set with
  `eval_set()`'s defaults (its fields then type-check as usual)."""
  if len(parts) != 4 or parts[0] != "eval" or parts[1] not in EVAL_ROLES:
    return
  e = cfg.get("eval")
  if e is None:
    return
  if e.get(parts[1]) is None:
    e[parts[1]] = ml_collections.ConfigDict()
  if parts[2] not in e[parts[1]]:
    e[parts[1]][parts[2]] = eval_set()


def validate(cfg: ml_collections.ConfigDict) -> None:
  """Cheap checks with the key named; deeper ones happen where values are used."""
  t = cfg.train
  checks = [("train.steps", t.steps >= 1, "must be >= 1"),
            ("train.grad_accum", t.grad_accum >= 1, "must be >= 1"),
            ("train.log_every", t.log_every >= 1, "must be >= 1"),
            ("train.keep", t.get("keep") is None or t.keep >= 1, "must be >= 1 (checkpoints kept)"),
            ("train.loss_chunk", t.get("loss_chunk", 256) >= 0, "must be >= 0 (0: full logits)"),
            ("train.router_aux_loss", t.get("router_aux_loss", 0.0) >= 0, "must be >= 0"),
            ("model.moe_capacity_factor", cfg.model.get("moe_capacity_factor", 0.0) >= 0,
             "must be >= 0 (0: dropless)"),
            ("train.best_mode", t.best_mode in ("max", "min"), "must be 'max' or 'min'"),
            ("data.batch_size", cfg.data.batch_size >= 1, "must be >= 1"),
            ("model.source", cfg.model.source in ("hf", "native", "tiny", "bench"),
             "must be hf | native | tiny | bench")]
  e = cfg.get("eval")
  if e is not None and e.get("weights") is not None:
    checks += [("eval.weights", len(e.weights) == 2, "must be (w_target, w_retention)"),
               ("eval.kl_tokens", e.get("kl_tokens", "supervised") in ("supervised", "all"),
                "must be supervised | all")]
    for role in ("target", "retention"):
      for name, s in (e.get(role) or {}).items():
        checks += [(f"eval.{role}.{name}.kind", s.kind in ("offline", "llava_json", "tfds"),
                    "must be offline | llava_json | tfds"),
                   (f"eval.{role}.{name}.metric", s.metric in ("vqa", "token"),
                    "must be vqa | token"),
                   (f"eval.{role}.{name}.num", s.num >= 0, "must be >= 0"),
                   (f"eval.{role}.{name}.source", s.kind == "offline" or not s.get("source"),
                    f"is for offline sets; a {s.kind} set reads eval.{role}.{name}.json_path "
                    f"(clear it: --config.eval.{role}.{name}.source=)")]
  ph = cfg.get("posthoc")
  if ph is not None:
    checks += [("posthoc.name", ph.name in ("none", "wise_ft", "dare", "ties"),
                "must be none | wise_ft | dare | ties")]
  p = cfg.get("penalty")
  if p is not None:
    checks += [("penalty.fisher_samples", p.get("fisher_samples", 1) >= 1, "must be >= 1"),
               ("penalty.fisher_chunk", p.get("fisher_chunk", 1) >= 1, "must be >= 1"),
               ("penalty.fisher_data", p.get("fisher_data", "train") in (
                   "", "train", "synthetic", "llava_json", "tfds"),
                "must be train | synthetic | llava_json | tfds")]
    syn = p.get("synthetic")
    if syn is not None and p.name == "gift":
      checks += [("penalty.synthetic.kind", syn.kind in ("procedural", "directory"),
                  "must be procedural | directory"),
                 ("penalty.synthetic.path", syn.kind != "directory" or bool(syn.path),
                  "must name the directory holding captions.jsonl (kind=directory)"),
                 ("penalty.synthetic.batch_size", syn.batch_size >= 0, "must be >= 0"),
                 ("penalty.synthetic.num", syn.num >= 1, "must be >= 1")]
  for key, ok, msg in checks:
    if not ok:
      raise ConfigError(f"config key '{key}' {msg}")
  if p is not None:  # names, combinations, weights: refused before any weight loads
    try:
      penalties.from_config(p)
    except penalties.PenaltyError as e:
      raise ConfigError(f"config 'penalty': {e}") from e
