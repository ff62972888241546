"""What a resumed run may change in its config.

Re-running `mllm-tune train` on a run directory that holds checkpoints resumes it with the
config given now. Keys that say how long to train (`train.steps`: a cosine or linear schedule
is then spread over the new total), where things are (any key naming a path, folder or
directory: logged as a warning, since it may name other data), how to log, save, select or
shard may change (`BENIGN`); every other key shapes the training or its evaluation (model,
method, optimizer, data, penalty, seed, eval sets, whose step-0 reference the run keeps), and a
resumed run that changes one would mix two trainings under one config.json. Those changes
are refused before anything loads, naming each key with its old and new value, unless
`train.allow_config_change` is set: then the run continues with the new values, logs them, and
keeps the config it had as `config.step<N>.json` beside the new `config.json`.
"""
from __future__ import annotations

import json
import logging
import os
import re

import jax

log = logging.getLogger(__name__)

# keys (or prefixes ending in ".") a resumed run may change
BENIGN = ("run_dir", "mesh.", "eval.batch_size", "posthoc.", "train.steps", "train.log_every",
          "train.eval_every", "train.save_every", "train.keep", "train.async_save",
          "train.nan_guard", "train.best_metric", "train.best_mode", "train.loss_chunk",
          "train.allow_config_change", "model.attention_impl", "model.remat_policy",
          "data.num_workers", "data.prefetch")
_LOCATION = re.compile(r"(path|folder|dir)s?$")


class ResumeConfigError(ValueError):
  """A resumed run's config changes keys that shape the training."""


def flat(tree, prefix: str = "") -> dict:
  """{dotted key: JSON value} of a config as `config.json` stores it."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def benign(key: str) -> bool:
  return (any(key == b or (b.endswith(".") and key.startswith(b)) for b in BENIGN)
          or bool(_LOCATION.search(key.rsplit(".", 1)[-1])))


def changes(old: dict, new: dict) -> list[tuple[str, object, object]]:
  """(key, old value, new value) of every key both configs have whose value differs, sorted.
  A key only one of them has is left out: config keys are added with defaults that keep what
  earlier versions did, so a run saved before a key existed resumes under a newer version."""
  a, b = flat(old), flat(new)
  return [(k, a[k], b[k]) for k in sorted(set(a) & set(b)) if a[k] != b[k]]


def _has_checkpoints(run_dir: str) -> bool:
  d = os.path.join(run_dir, "checkpoints")
  return os.path.isdir(d) and any(n.isdigit() for n in os.listdir(d))


def check(cfg) -> list[tuple[str, object, object]]:
  """Before a run directory with checkpoints resumes: the config's changes against its
  `config.json` ([] for a new run). Changes of keys that shape training raise
  `ResumeConfigError` unless `train.allow_config_change`; the changes are returned either way
  (`keep_previous` records them)."""
  path = os.path.join(cfg.run_dir, "config.json")
  if not (os.path.isfile(path) and _has_checkpoints(cfg.run_dir)):
    return []
  with open(path) as f:
    old = json.load(f)
  diff = changes(old, json.loads(cfg.to_json_best_effort()))
  shaping = [c for c in diff if not benign(c[0])]
  if shaping and not cfg.train.get("allow_config_change", False):
    listed = "; ".join(f"{k}: {json.dumps(a)} -> {json.dumps(b)}" for k, a, b in shaping)
    raise ResumeConfigError(
        f"{cfg.run_dir} holds checkpoints of a run trained with {path}, and this config "
        f"changes keys that shape the training: {listed}. Resume with the run's values, train "
        "into a new run_dir, or set --config.train.allow_config_change=true to continue with "
        "the new values (the previous config is kept as config.step<N>.json)")
  for k, a, b in diff:  # a location may name other data: said as loudly as a forced change
    quiet = benign(k) and not _LOCATION.search(k.rsplit(".", 1)[-1])
    log.log(logging.INFO if quiet else logging.WARNING, "resuming %s with %s: %s -> %s",
            cfg.run_dir, k, json.dumps(a), json.dumps(b))
  return diff


def keep_previous(run_dir: str, step: int, diff: list) -> None:
  """Before a resumed run writes its config.json: when keys that shape training changed
  (allowed by `train.allow_config_change`), keep the config the run had until `step` as
  `config.step<step>.json`."""
  path = os.path.join(run_dir, "config.json")
  if jax.process_index() != 0:  # every process resumes the same directory
    return
  if step and any(not benign(k) for k, _, _ in diff) and os.path.isfile(path):
    os.replace(path, os.path.join(run_dir, f"config.step{step}.json"))
