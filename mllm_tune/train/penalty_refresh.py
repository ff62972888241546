"""Online EWC refreshed within a run (`penalty.refresh_every` K > 0, docs/methods.md §5.2).

After every K-th step (not after the last), the online update runs as between two stages:
the Fisher F_k of the weighted leaves at the current weights (the merged view where the method
merges, e.g. K0 + s A B for LoRA; `penalty.fisher_samples` samples of the Fisher data, or of the
next training batches, rewound; the sampling key folds in the step), then

    F~ <- gamma F~ + F_k,        theta* <- the current weights (float32).

The refresh at step k is saved to `run_dir/importance/online_ewc_refresh/step_<k>/`: `importance`
(an importance file, usable as a later stage's `penalty.prev_fisher_path`) and `anchor` (orbax
tensors). A resumed run reads the newest refresh at or before its checkpoint's step, so resume
stays exact (a missing one is refused); a refresh written after that checkpoint is recomputed,
identically, when the run gets there again. Refreshes older than the one the oldest kept
checkpoint needs are removed (each holds two float32 copies of the weighted leaves). A later
stage can read the last `step_<k>/importance` as its `prev_fisher_path`. The Fisher engine and
the anchor's function compile once for the run (the refreshes reuse them: same model, same
shapes).
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
from mllm_tune.train.setup import ConfigValueError
from mllm_tune.tuning.api import MethodError

log = logging.getLogger(__name__)
SUBDIR = os.path.join("importance", "online_ewc_refresh")
STEP_DIR = re.compile(r"^step_(\d+)$")


def every(bound) -> int:
  """K of `penalty.refresh_every` (0: no refresh, no penalty, or a penalty at weight 0)."""
  k = int(getattr(getattr(bound, "penalty", None), "refresh_every", 0) or 0)
  return k if k and bound.active else 0


def due(bound, step: int, total: int) -> bool:
  """Whether the refresh runs after `step` (1-based) of a `total`-step run."""
  k = every(bound)
  return k > 0 and step % k == 0 and step < total


def last_before(step: int, k: int, total: int) -> int:
  """The step of the newest refresh a run at `step` has made (0: none yet)."""
  m = (step // k) * k
  return m - k if m >= total else m


def check(bound, variables: dict, fisher_data=None) -> None:
  """Refuses a refresh whose Fisher cannot be computed: from a one-pass iterator (read again at
  each refresh), or on a merged model the method cannot form (e.g. LoRA's `lora_bias` on a
  layer without a bias)."""
  if not every(bound):
    return
  if hasattr(fisher_data, "__next__"):
    raise ConfigValueError("config 'penalty.refresh_every': each refresh reads the Fisher data "
                           "again, but fisher_data is a one-pass iterator: pass a list or a "
                           "factory `model -> batches`")
  if not bound.merged:
    return
  try:
    jax.eval_shape(bound.method.merge, variables)
  except MethodError as e:
    raise ConfigValueError(f"config 'penalty.refresh_every': each refresh computes the Fisher "
                           f"on the merged model at the current weights, which this method "
                           f"cannot form: {e}") from e


def current_anchor(bound, trainable: dict, frozen: dict) -> dict:
  """theta* = the weighted leaves as the penalty reads them now (float32, merged view): the
  first anchor too, so that the term is 0 at step 0 also where the frozen base is stored in
  another dtype than it was loaded in (`model.frozen_dtype`)."""
  return bound.jitted_current_weights(trainable, frozen)  # compiled once for the run


def refreshed(pcfg, model, bound, trainable: dict, frozen: dict, consts: dict, step: int, *,
              fisher_data=None, train_data=None, mesh=None) -> tuple[dict, int]:
  """(new consts {"importance": F~, "anchor": theta*}, samples the Fisher used) after `step`."""
  anchor = current_anchor(bound, trainable, frozen)
  variables = tuning.combine(trainable, frozen)
  if bound.merged:  # the model at the current weights, the weighted leaves in float32
    flat = pytree.flatten({"params": bound.method.merge(variables)})
    flat.update(anchor)
    fvars = {"params": pytree.unflatten(flat)["params"], "adapters": {}}
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
  return {"importance": importance, "anchor": anchor}, n


def save(run_dir: str, step: int, consts: dict, *, kind: str, gamma: float, every_k: int,
         num_examples: int, model_config=None, base_fingerprint: str = "",
         base_path: str = "") -> str:
  """Write the refresh of `step` (see the module docstring); returns its directory.
  `refresh.json`, written last, marks it complete."""
  import orbax.checkpoint as ocp
  path = os.path.join(os.path.abspath(run_dir), SUBDIR, f"step_{step}")
  marker = os.path.join(path, "refresh.json")
  if jax.process_index() == 0 and os.path.isfile(marker):  # rewritten (a resumed run)
    os.remove(marker)
  importance_store.save_importance(
      os.path.join(path, "importance"), consts["importance"], kind=kind,
      model_config=model_config, base_fingerprint=base_fingerprint, base_path=base_path,
      num_examples=num_examples, extra={"gamma": gamma, "refresh_step": step})
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(os.path.join(path, "anchor"), pytree.unflatten(dict(consts["anchor"])), force=True)
  ckptr.wait_until_finished()
  if jax.process_index() == 0:
    with open(marker, "w") as f:
      json.dump({"step": step, "gamma": gamma, "refresh_every": every_k,
                 "num_examples": num_examples, "anchor_leaves": sorted(consts["anchor"])}, f,
                indent=2)
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


def load(run_dir: str, step: int, like: dict, *, gamma: float, every_k: int,
         model_config=None, base_fingerprint: str | None = None) -> dict:
  """The consts of the refresh at `step`, shaped, typed and placed like `like` (the run's
  current consts); refused when written with another gamma or refresh_every, for another
  model or base, or for other leaves."""
  import orbax.checkpoint as ocp
  path = os.path.join(os.path.abspath(run_dir), SUBDIR, f"step_{step}")
  with open(os.path.join(path, "refresh.json")) as f:
    meta = json.load(f)
  for key, want in (("gamma", gamma), ("refresh_every", every_k)):
    if meta.get(key) != want:
      raise fisher_lib.ImportanceError(
          f"{path}: written with penalty.{key}={meta.get(key)}, but this run has {want}: the "
          "resumed run must refresh as the run that wrote it did")
  abstract = lambda d: {p: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
                        for p, x in d.items()}
  importance = penalty_setup.load_on_every_process(
      os.path.join(path, "importance"), model_config=model_config,
      base_fingerprint=base_fingerprint,
      expect_shapes={p: tuple(x.shape) for p, x in like["importance"].items()},
      shardings={p: x.sharding for p, x in like["importance"].items()})
  if set(importance) != set(like["importance"]):
    raise fisher_lib.ImportanceError(
        f"{path}: the refresh covers leaves {sorted(set(importance) ^ set(like['importance']))[:4]}"
        " this run's penalty does not (or vice versa)")
  anchor = ocp.StandardCheckpointer().restore(os.path.join(path, "anchor"),
                                              pytree.unflatten(abstract(like["anchor"])))
  return {"importance": importance, "anchor": pytree.flatten(anchor)}


def on_resume(trainer, step: int) -> dict | None:
  """The consts a run resumed at `step` continues with: those of its newest refresh (None: no
  refresh yet, keep the initial ones). A missing refresh is refused, naming it (never a silent
  fall-back to older consts)."""
  k = every(trainer.penalty)
  want = last_before(step, k, trainer.cfg.train.steps) if k else 0
  if want <= 0:
    return None
  found = newest(trainer.run_dir, step)
  if found != want:
    raise fisher_lib.ImportanceError(
        f"resuming at step {step} with penalty.refresh_every={k}: the refresh of step {want} "
        f"({os.path.join(trainer.run_dir, SUBDIR, f'step_{want}')}) is missing (newest found: "
        f"{found}); was refresh_every changed or the directory removed?")
  p = trainer.penalty.penalty
  return load(trainer.run_dir, want, trainer.penalty_consts, gamma=p.gamma, every_k=k,
              model_config=trainer.model.config, base_fingerprint=trainer.base_fingerprint)


def refresh_and_save(trainer, step: int) -> dict:
  """The trainer's refreshed consts after `step`, saved under its run directory."""
  t0 = time.time()
  consts, n = refreshed(trainer.cfg.penalty, trainer.model, trainer.penalty,
                        trainer.state.trainable, trainer.frozen, trainer.penalty_consts, step,
                        fisher_data=trainer.fisher_data, train_data=trainer.data,
                        mesh=trainer.mesh)
  p = trainer.penalty.penalty
  path = save(trainer.run_dir, step, consts, kind=p.fisher_kind, gamma=p.gamma,
              every_k=every(trainer.penalty), num_examples=n,
              model_config=trainer.model.config, base_fingerprint=trainer.base_fingerprint,
              base_path=trainer.base_path)
  log.info("penalty online_ewc: refreshed after step %d (Fisher of %d leaves from %d samples, "
           "anchor = the current weights) in %.1fs -> %s", step, len(consts["importance"]), n,
           time.time() - t0, path)
  oldest = min(list(trainer.ckpt.all_steps()) + [step])
  prune(trainer.run_dir, last_before(oldest, every(trainer.penalty), trainer.cfg.train.steps))
  return consts


def prune(run_dir: str, keep_from: int) -> None:
  """Remove the refreshes before step `keep_from` (the one the oldest kept checkpoint resumes
  with); process 0 only."""
  import shutil
  root = os.path.join(os.path.abspath(run_dir), SUBDIR)
  if jax.process_index() != 0 or not os.path.isdir(root):
    return
  for name in os.listdir(root):
    m = STEP_DIR.match(name)
    if m and int(m.group(1)) < keep_from:
      shutil.rmtree(os.path.join(root, name), ignore_errors=True)
