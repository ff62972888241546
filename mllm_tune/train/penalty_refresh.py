"""Online EWC refreshed within a run (`penalty.refresh_every` K > 0, docs/methods.md §5.2).

After every K-th step (not after the last), the online update runs as between two stages:
the Fisher F_k of the weighted leaves at the current weights (the merged view where the method
merges, e.g. K0 + s A B for LoRA; `penalty.fisher_samples` samples of the Fisher data, or of the
next training batches, rewound; the sampling key folds in the step), then

    F~ <- gamma F~ + F_k,        theta* <- the current weights (float32).

The refresh at step k is saved to `run_dir/importance/online_ewc_refresh/step_<k>/`: `importance`
(an importance file, usable as a later stage's `penalty.prev_fisher_path`) and `anchor` (orbax
tensors). A resumed run reads the newest refresh at or before its checkpoint's step, so resume
stays exact; a refresh written after that checkpoint is recomputed, identically, when the run
gets there again. Every refresh is kept (each holds two float32 copies of the weighted leaves).
"""
from __future__ import annotations

import json
import logging
import os
import re
import time

import jax
import numpy as np

from mllm_tune import pytree, tuning
from mllm_tune.importance import fisher as fisher_lib
from mllm_tune.importance import store as importance_store
from mllm_tune.train import penalty_setup

log = logging.getLogger(__name__)
SUBDIR = os.path.join("importance", "online_ewc_refresh")
STEP_DIR = re.compile(r"^step_(\d+)$")


def every(bound) -> int:
  """K of `penalty.refresh_every` (0: no refresh, or no penalty)."""
  return int(getattr(getattr(bound, "penalty", None), "refresh_every", 0) or 0)


def due(bound, step: int, total: int) -> bool:
  """Whether the refresh runs after `step` (1-based) of a `total`-step run."""
  k = every(bound)
  return k > 0 and step % k == 0 and step < total


def refreshed(pcfg, model, bound, trainable: dict, frozen: dict, consts: dict, step: int, *,
              fisher_data=None, train_data=None, mesh=None) -> tuple[dict, int]:
  """(new consts {"importance": F~, "anchor": theta*}, samples the Fisher used) after `step`."""
  variables = tuning.combine(trainable, frozen)
  if bound.merged:
    fvars = {"params": bound.method.merge(variables), "adapters": {}}
  else:
    fvars = variables
  weighted = set(bound.weighted)
  leaves = pytree.unflatten({p: p in weighted for p in pytree.flatten(fvars)})
  leaves.setdefault("adapters", {})
  kind = bound.penalty.fisher_kind
  rng = jax.random.fold_in(jax.random.key(pcfg.fisher_seed), step)
  current, n = penalty_setup.importance_on(pcfg, kind, model, fvars, leaves, rng, fisher_data,
                                           train_data, mesh)
  importance = fisher_lib.online_update(consts["importance"], current, bound.penalty.gamma)
  anchor = jax.jit(bound.current_weights)(trainable, frozen)
  return {"importance": importance, "anchor": anchor}, n


def save(run_dir: str, step: int, consts: dict, *, kind: str, gamma: float, num_examples: int,
         model_config=None, base_fingerprint: str = "", base_path: str = "") -> str:
  """Write the refresh of `step` (see the module docstring); returns its directory."""
  import orbax.checkpoint as ocp
  path = os.path.join(os.path.abspath(run_dir), SUBDIR, f"step_{step}")
  importance_store.save_importance(
      os.path.join(path, "importance"), consts["importance"], kind=kind,
      model_config=model_config, base_fingerprint=base_fingerprint, base_path=base_path,
      num_examples=num_examples, extra={"gamma": gamma, "refresh_step": step})
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(os.path.join(path, "anchor"), pytree.unflatten(dict(consts["anchor"])), force=True)
  ckptr.wait_until_finished()
  if jax.process_index() == 0:
    with open(os.path.join(path, "refresh.json"), "w") as f:
      json.dump({"step": step, "gamma": gamma, "num_examples": num_examples,
                 "anchor_leaves": sorted(consts["anchor"])}, f, indent=2)
  return path


def newest(run_dir: str, step: int) -> int | None:
  """The newest complete refresh at or before `step` (as process 0 sees it), or None."""
  root = os.path.join(os.path.abspath(run_dir), SUBDIR)
  found = []
  if os.path.isdir(root):
    for name in os.listdir(root):
      m = STEP_DIR.match(name)
      if m and int(m.group(1)) <= step and os.path.isfile(os.path.join(root, name,
                                                                       "refresh.json")):
        found.append(int(m.group(1)))
  best = max(found) if found else -1
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    best = int(multihost_utils.broadcast_one_to_all(np.int32(best)))
  return None if best < 0 else best


def load(run_dir: str, step: int, like: dict, *, model_config=None) -> dict:
  """The consts of the refresh at `step`, shaped, typed and placed like `like` (the run's
  current consts)."""
  import orbax.checkpoint as ocp
  path = os.path.join(os.path.abspath(run_dir), SUBDIR, f"step_{step}")
  abstract = lambda d: {p: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
                        for p, x in d.items()}
  importance = penalty_setup.load_on_every_process(
      os.path.join(path, "importance"), model_config=model_config,
      expect_shapes={p: tuple(x.shape) for p, x in like["importance"].items()},
      shardings={p: x.sharding for p, x in like["importance"].items()})
  if set(importance) != set(like["importance"]):
    raise fisher_lib.ImportanceError(
        f"{path}: the refresh covers leaves {sorted(set(importance) ^ set(like['importance']))[:4]}"
        " this run's penalty does not (or vice versa)")
  anchor = ocp.StandardCheckpointer().restore(os.path.join(path, "anchor"),
                                              pytree.unflatten(abstract(like["anchor"])))
  return {"importance": importance, "anchor": pytree.flatten(anchor)}


def refresh_and_save(trainer, step: int) -> dict:
  """The trainer's refreshed consts after `step`, saved under its run directory."""
  t0 = time.time()
  consts, n = refreshed(trainer.cfg.penalty, trainer.model, trainer.penalty,
                        trainer.state.trainable, trainer.frozen, trainer.penalty_consts, step,
                        fisher_data=trainer.fisher_data, train_data=trainer.data,
                        mesh=trainer.mesh)
  path = save(trainer.run_dir, step, consts, kind=trainer.penalty.penalty.fisher_kind,
              gamma=trainer.penalty.penalty.gamma, num_examples=n,
              model_config=trainer.model.config, base_fingerprint=trainer.base_fingerprint,
              base_path=trainer.base_path)
  log.info("penalty online_ewc: refreshed after step %d (Fisher of %d leaves from %d samples, "
           "anchor = the current weights) in %.1fs -> %s", step, len(consts["importance"]), n,
           time.time() - t0, path)
  return consts
