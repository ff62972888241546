"""A training run directory read back: its config, its checkpoint steps, its selected step and
its trained variables, without the data pipeline or the optimizer state.

    run = load_run("runs/llava_lora", step="best")   # None: latest checkpoint; N; "best"
    logits = run.model.apply(run.variables, ids, mask, pixel_values=px)
    params = run.method.merge(run.variables)         # -> mt.save_pretrained(...)

A run directory (what `Trainer.run` writes) holds `config.json` (the training config),
`checkpoints/<step>/` (orbax: the trainable leaves, optimizer state, data position, meta) and
`metrics.jsonl`. The base is loaded as the config says (`model.source` / `model.path`; `base=`
overrides the path, e.g. when the run was started from another working directory) and must have
the fingerprint the checkpoint recorded. The method comes from the checkpoint's meta and
`init_variables` is redone with the run's seed (so frozen random leaves, e.g. VeRA's shared
matrices, and PiSSA's residual base are the ones training used); the checkpoint's trainable
leaves then replace their initial values.

"best" is the run's own selection: with eval sets (`retention.json`), the step the run report
selects (best by `train.best_metric`, default the trade-off score O, among checkpointed steps,
ties to the earliest); without them, orbax's best checkpoint by `train.best_metric`; a run with
neither has no selection and "best" is refused.
"""
from __future__ import annotations

import json
import os
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np

from mllm_tune import pytree, tuning
from mllm_tune.checkpoints.orbax_io import TrainCheckpointer, params_fingerprint
from mllm_tune.checkpoints.safetensors_io import CheckpointError
from mllm_tune.train import setup

CONFIG_FILE = "config.json"
CHECKPOINTS = "checkpoints"


class RunError(ValueError):
  """Not a run directory, no such step, no selection, or a base that does not fit."""


class TrainedRun(NamedTuple):
  model: Any            # the flax Module (the base's architecture)
  variables: dict       # {"params", "adapters"}: the base with the run's trained leaves
  method: tuning.Method
  config: ml_collections.ConfigDict   # the run's training config
  step: int             # the checkpoint step read
  base_path: str        # where the base was loaded from ("tiny:<seed>" for tiny models)
  trained: frozenset    # variables paths ("params/..", "adapters/..") the checkpoint holds


def is_run_dir(path: str) -> bool:
  """A training run directory: a `config.json` with `method` and `train` sections (not an HF
  config), or a `checkpoints/` folder."""
  cfg = os.path.join(path, CONFIG_FILE)
  if os.path.isfile(cfg):
    try:
      with open(cfg) as f:
        d = json.load(f)
    except (OSError, json.JSONDecodeError):
      return False
    return isinstance(d, dict) and "method" in d and "train" in d and "model_type" not in d
  return os.path.isdir(os.path.join(path, CHECKPOINTS)) and not os.path.isfile(
      os.path.join(path, "mllm_config.json"))


def read_config(run_dir: str) -> ml_collections.ConfigDict:
  path = os.path.join(run_dir, CONFIG_FILE)
  if not os.path.isfile(path):
    raise RunError(f"{run_dir}: no {CONFIG_FILE} (is this a training run directory?)")
  try:
    with open(path) as f:
      d = json.load(f)
  except json.JSONDecodeError as e:
    raise RunError(f"{path}: malformed JSON at line {e.lineno}: {e.msg}") from e
  if not (isinstance(d, dict) and "method" in d and "model" in d):
    raise RunError(f"{path}: not a training config (no 'model' / 'method' sections)")
  return ml_collections.ConfigDict(d)


def checkpointer(run_dir: str, cfg=None) -> TrainCheckpointer:
  d = os.path.join(run_dir, CHECKPOINTS)
  if not os.path.isdir(d):
    raise RunError(f"{run_dir}: no {CHECKPOINTS}/ folder (the run saved no checkpoint)")
  t = cfg.train if cfg is not None else None
  metric = (t.get("best_metric") or None) if t is not None else None
  return TrainCheckpointer(d, max_to_keep=None, best_metric=metric,
                           best_mode=t.get("best_mode", "max") if t is not None else "max",
                           async_save=False)


def best_step(run_dir: str, cfg, ckpt: TrainCheckpointer) -> int:
  """The run's selected checkpoint step (module docstring), or RunError saying why none."""
  if os.path.isfile(os.path.join(run_dir, "retention.json")):
    from mllm_tune.eval import run_report
    sel = run_report.selected(run_report.load_run(run_dir))
    if sel.step is None or not sel.among_checkpoints:
      raise RunError(f"{run_dir}: the run's selection has no checkpoint to read "
                     f"({sel.note or 'no eval step was checkpointed'}); pass a step "
                     f"(checkpoints: {sorted(ckpt.all_steps())})")
    return int(sel.step)
  if cfg.train.get("best_metric"):
    step = ckpt.best_step()
    if step is None:
      raise RunError(f"{run_dir}: no checkpoint was ranked by train.best_metric="
                     f"{cfg.train.best_metric!r}")
    return int(step)
  raise RunError(f"{run_dir}: the run has no selection (train.best_metric is empty and it has "
                 "no eval sets, so there is no 'best' step); pass a step (checkpoints: "
                 f"{sorted(ckpt.all_steps())})")


def resolve_step(run_dir: str, cfg, ckpt: TrainCheckpointer, step: int | str | None) -> int:
  steps = sorted(ckpt.all_steps())
  if not steps:
    raise RunError(f"{ckpt.directory}: no checkpoint")
  if step is None:
    return steps[-1]
  if step == "best":
    return best_step(run_dir, cfg, ckpt)
  if isinstance(step, str) and not step.isdigit():
    raise RunError(f"step must be None, an integer or 'best', got {step!r}")
  if int(step) not in steps:
    raise RunError(f"{run_dir}: no checkpoint at step {step} (checkpoints: {steps})")
  return int(step)


def load_run(run_dir: str, step: int | str | None = None, base: str | None = None
             ) -> TrainedRun:
  """A run's trained variables at checkpoint `step` (None: the latest; "best": the run's
  selection) -> TrainedRun(model, variables, method, config, step, base_path, trained)."""
  run_dir = os.path.abspath(run_dir)
  cfg = read_config(run_dir)
  ckpt = checkpointer(run_dir, cfg)
  step = resolve_step(run_dir, cfg, ckpt, step)
  m = cfg.model
  if base:
    m.path, m.source = os.path.abspath(base), "native" if os.path.isfile(
        os.path.join(base, "mllm_config.json")) else "hf"
  if m.source in ("hf", "native") and not os.path.isdir(m.path):
    raise RunError(f"{run_dir}: the run's base model.path={m.path!r} is not a directory "
                   "(relative to where training ran?); give the base explicitly (base=, "
                   "--base)")
  model, params, base_path = setup.load_model(m)
  trainable, meta = ckpt.restore_trainable(step, params_fingerprint(params))
  method = setup.method_from(meta.get("method") or cfg.method)
  variables = method.init_variables(jax.random.fold_in(jax.random.key(cfg.seed), 1), params)
  flat = pytree.flatten(variables)
  saved = pytree.flatten(trainable)
  for path, x in saved.items():
    if path not in flat:
      raise CheckpointError(f"{ckpt.directory}/{step}: trained leaf '{path}' has no "
                            f"counterpart in method '{tuning.api.label(method)}' on this base")
    if tuple(np.shape(flat[path])) != tuple(x.shape):
      raise CheckpointError(f"{ckpt.directory}/{step}: trained leaf '{path}' has shape "
                            f"{list(x.shape)} but the method on this base makes "
                            f"{list(np.shape(flat[path]))}")
    flat[path] = x  # as trained (float32 master weights)
  variables = pytree.unflatten(flat)
  variables.setdefault("adapters", {})
  return TrainedRun(model, variables, method, cfg, step, base_path, frozenset(saved))
