"""Train-state checkpoints with orbax's `CheckpointManager`.

Each step directory holds three items: `state` (the trainable partition, optimizer state, step and
rng: never the frozen base), `data` (the data iterator's JSON state, for exact resume) and `meta`
(the base model's path and content hash, checked on restore, plus the step's metrics). Saves are
asynchronous; `max_to_keep` keeps the newest N, and with `best_metric` the best N by that metric
(e.g. the survey's combined score) plus the newest one, which a resumed run continues from.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from mllm_tune.checkpoints.safetensors_io import CheckpointError
from mllm_tune import pytree


def params_fingerprint(params: dict) -> str:
  """Content hash of a params tree (shapes, dtypes and a strided sample of every leaf's bytes).

  Cheap enough to run at every start on a 7B model; any re-conversion, dtype change or edit of
  a leaf's sampled region changes it."""
  h = hashlib.sha256()
  for path, x in sorted(pytree.flatten(params).items()):
    h.update(f"{path}:{tuple(x.shape)}:{x.dtype}".encode())
    step = max(1, int(np.prod(x.shape)) // 4096)
    h.update(np.ascontiguousarray(_strided_sample(x, step)).tobytes())
  return h.hexdigest()[:32]


def _strided_sample(x, step: int) -> np.ndarray:
  """Every `step`-th element, gathered replicated so every process can read it."""
  sharding = getattr(x, "sharding", None)
  if isinstance(sharding, jax.sharding.NamedSharding) and not x.is_fully_addressable:
    out = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
    sample = jax.jit(lambda a: a.reshape(-1)[::step], out_shardings=out)(x)
    return np.asarray(sample.addressable_data(0))
  return np.asarray(jax.device_get(x)).reshape(-1)[::step]


log = logging.getLogger(__name__)


class CheckpointReadError(CheckpointError):
  """A step's files cannot be read (truncated, missing, corrupt): the step, the path and
  orbax's / tensorstore's reason. Resume falls back to an older step on this error only."""


def _first_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


class TrainCheckpointer:
  """Save / restore `(state pytree, data state, meta)` per step under `directory`."""

  def __init__(self, directory: str, max_to_keep: int | None = 3,
               best_metric: str | None = None, best_mode: str = "max",
               async_save: bool = True):
    self.directory = os.path.abspath(directory)
    self.best_metric = best_metric
    best_fn = (lambda m: float(m[best_metric])) if best_metric else None
    keep: dict = {"max_to_keep": max_to_keep}
    if best_metric:  # the best N, and always the newest: resume continues from it
      keep = {"preservation_policy": ocp.checkpoint_managers.AnyPreservationPolicy([
          ocp.checkpoint_managers.LatestN(n=1),
          ocp.checkpoint_managers.BestN(get_metric_fn=best_fn, reverse=best_mode == "min",
                                        n=max_to_keep, keep_checkpoints_without_metrics=False)])}
    opts = ocp.CheckpointManagerOptions(
        create=True, enable_async_checkpointing=async_save, best_fn=best_fn,
        best_mode=best_mode, keep_checkpoints_without_metrics=best_metric is None, **keep)
    self.manager = ocp.CheckpointManager(self.directory, options=opts,
                                         item_names=("state", "data", "meta"))

  def save(self, step: int, state: Any, data_state: dict, meta: dict,
           metrics: dict | None = None, force: bool = False) -> bool:
    metrics = {k: float(v) for k, v in (metrics or {}).items()}
    if self.best_metric and self.best_metric not in metrics:
      metrics = None  # not ranked: kept while it is the newest
    try:
      return self.manager.save(
          step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                        data=ocp.args.JsonSave(data_state),
                                        meta=ocp.args.JsonSave(json.loads(json.dumps(meta)))),
          metrics=metrics, force=force)
    except Exception as e:  # orbax / tensorstore / OS errors, with the step and path
      raise CheckpointError(f"{self.directory}/{step}: saving the checkpoint failed "
                            f"({_first_line(e)})") from e

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def best_step(self) -> int | None:
    return self.manager.best_step() if self.best_metric else self.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def restore(self, step: int | None, abstract_state: Any,
              expect_fingerprint: str | None = None) -> tuple[Any, dict, dict]:
    """-> (state, data_state, meta). `abstract_state` carries target shapes/shardings."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"{self.directory}: no checkpoint to restore")
    where = f"{self.directory}/{step}"
    meta = self.read_meta(step, expect_fingerprint)
    try:
      out = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    except Exception as e:
      raise CheckpointReadError(f"{where}: cannot read its state or data item "
                                f"({_first_line(e)})") from e
    return out["state"], out["data"], meta

  def restore_newest(self, abstract_state: Any, expect_fingerprint: str | None = None
                     ) -> tuple[int, Any, dict] | None:
    """(step, state, data_state) of the newest readable checkpoint, None when there is none. A
    step whose files cannot be read is skipped with a warning naming it and why; a base
    mismatch refuses at once; when steps exist but none can be read, `CheckpointError` (never
    a silent start from scratch)."""
    steps = sorted(self.all_steps(), reverse=True)
    skipped = []
    for step in steps:
      try:
        state, data_state, _ = self.restore(step, abstract_state, expect_fingerprint)
      except CheckpointReadError as e:
        log.warning("skipping checkpoint step %d: %s", step, e)
        skipped.append(str(e))
        continue
      return step, state, data_state
    if not steps:
      return None
    raise CheckpointError(f"{self.directory}: none of the checkpoints (steps "
                          f"{', '.join(map(str, steps))}) can be read, so the run cannot resume "
                          f"(remove the directory to start over): " + "; ".join(skipped))

  def read_meta(self, step: int, expect_fingerprint: str | None = None) -> dict:
    """`step`'s meta item (base path and fingerprint, method, metrics); a base whose
    fingerprint differs from `expect_fingerprint` is refused."""
    where = f"{self.directory}/{step}"
    try:
      meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
      meta = meta["meta"]
    except Exception as e:
      raise CheckpointReadError(f"{where}: cannot read its meta item ({_first_line(e)})") from e
    if not isinstance(meta, dict):
      raise CheckpointReadError(f"{where}: its meta item is not a JSON object")
    if expect_fingerprint and meta.get("base_fingerprint") != expect_fingerprint:
      raise CheckpointError(
          f"{self.directory}/{step}: this checkpoint was trained on base "
          f"'{meta.get('base_path')}' (fingerprint {meta.get('base_fingerprint')}), but the "
          f"base loaded now has fingerprint {expect_fingerprint}: refusing to mix them")
    return meta

  def restore_trainable(self, step: int, expect_fingerprint: str | None = None
                        ) -> tuple[dict, dict]:
    """(the trainable leaves of `step`'s state, its meta), read alone onto the first device:
    no optimizer state, no abstract tree from the caller (shapes come from the checkpoint)."""
    meta = self.read_meta(step, expect_fingerprint)
    path = os.path.join(self.directory, str(step), "state")
    absl = logging.getLogger("absl")  # orbax warns that an item has no step-level metadata file
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
      ckptr = ocp.PyTreeCheckpointer()
      saved = ckptr.metadata(path).item_metadata["trainable"]
      sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
      abstract = {"trainable": jax.tree.map(
          lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), saved)}
      out = ckptr.restore(path, args=ocp.args.PyTreeRestore(
          item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
          partial_restore=True))
    except Exception as e:
      raise CheckpointReadError(f"{path}: cannot read its trainable leaves "
                                f"({_first_line(e)})") from e
    finally:
      absl.setLevel(level)
    return out["trainable"], meta

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def debug_kill(step: int, ckpt: TrainCheckpointer) -> None:
  """Test hook: `MLLM_DEBUG_KILL=STEP[:during_save|:sigterm]` SIGKILLs this process after STEP
  (by default once pending saves are committed, with `during_save` while one may be in flight),
  or sends it SIGTERM (the pre-emption path)."""
  spec = os.environ.get("MLLM_DEBUG_KILL")
  if not spec:
    return
  at, _, phase = spec.partition(":")
  if step == int(at):
    if phase == "sigterm":
      os.kill(os.getpid(), signal.SIGTERM)
      return
    if phase != "during_save":
      ckpt.wait()
    os.kill(os.getpid(), signal.SIGKILL)
