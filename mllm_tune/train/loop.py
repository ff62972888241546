"""The training loop: sharded jit step, checkpoints with exact resume, logs, guards.

    trainer = Trainer(cfg, data=iterator)      # cfg: configs/base.py layout
    summary = trainer.run()

Side effects live here (IO, logging, signals); the math is in `step.py`. Resume: if the run's
checkpoint directory holds a step, the trainable state, optimizer state, rng and data-iterator
state are restored and training continues bit-exactly (CPU). A non-finite loss stops the run
with the step, the offending leaves and batch fields named, without saving the bad state.
SIGTERM (pre-emptible TPU VMs) saves a checkpoint and returns cleanly.

A `penalty` config section (configs/penalties/*.py) adds a forgetting penalty to any method: its
importance (Fisher / MAS) is loaded from `penalty.fisher_path` or computed from `fisher_data`
(default: the first training batches, rewound) and saved there (default
`run_dir/importance/<kind>`, reused on resume); see `penalty_setup.py`. GIFT (`penalty.name=gift`)
also draws one synthetic caption batch per step (`penalty.synthetic`), prepared with the model
directory's tokenizer and image processor and the data's template (`penalty_setup.py`); the
batch of step s is a pure function of (synthetic.seed, s), so resume stays exact.

Target and retention sets (`eval.target`, `eval.retention`) are scored at step 0, every
`train.eval_every` steps and at the last step by `tracking.Tracker` (task metric, KL from θ0,
trade-off scores); with `train.best_metric` a checkpoint is saved at each eval and the best kept;
a recipe's post-hoc step and the run report follow the last step (`tracking.py`).
"""
from __future__ import annotations

import functools
import logging
import os
import signal
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from mllm_tune import pytree, tuning
from mllm_tune.checkpoints.orbax_io import TrainCheckpointer, debug_kill, params_fingerprint
from mllm_tune.data.errors import skipped_by_reason
from mllm_tune.train import (build, penalty_refresh, penalty_setup, resume_check, setup,
                             tracking)
from mllm_tune.train import sharding as shard_lib
from mllm_tune.train.logs import (JsonlWriter, TensorBoardWriter, bar_scores,
                                  drop_records_after)
from mllm_tune.train.step import TrainState, eval_step, find_nonfinite, train_step

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
  """The run cannot continue (non-finite loss, bad batch)."""


class Trainer:
  def __init__(self, cfg, data, eval_fn: Callable[["Trainer", int], dict] | None = None,
               progress: bool = True, fisher_data=None):
    """`fisher_data`: batches (iterable, or a factory `model -> iterable`) the penalty's
    importance is computed from when no file holds it (default: the training batches)."""
    self.cfg, self.data, self.eval_fn, self.progress = cfg, data, eval_fn, progress
    self.fisher_data = fisher_data  # read again by online EWC's in-run refresh
    self.resume_changes = resume_check.check(cfg)  # a resume's config changes, before loading
    devices = jax.devices()[:cfg.mesh.devices] if cfg.mesh.get("devices") else None
    self.mesh = shard_lib.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, devices,
                                    expert=cfg.mesh.get("expert", 1))
    if cfg.model.source == "bench":
      raise setup.ConfigValueError(
          "config key 'model.source': 'bench' names the offline benchmark's pre-trained base; "
          "resolve it first with mllm_tune.benchmark.pretrain.resolve_model_source(cfg.model) "
          "(mllm-tune train does), which builds or finds the base and sets source='hf'")
    setup.check_model_files(cfg)  # tokenizer / image processor errors before the weights load
    capacity = cfg.model.get("moe_capacity_factor", 0.0)
    if self.mesh.shape["expert"] > 1 or capacity:  # before the weights load
      setup.check_expert_mesh(setup.read_model_config(cfg.model), self.mesh, capacity)
    self.param_sharding = sfn = shard_lib.sharding_fn(self.mesh)
    self.model, params, self.base_path = setup.load_model(cfg.model, sharding_fn=sfn)
    with shard_lib.mesh_context(self.mesh):  # expert parallelism reads the ambient mesh
      self._build(params, fisher_data)

  def _build(self, params, fisher_data) -> None:
    cfg, t, data = self.cfg, self.cfg.train, self.data
    self.base_fingerprint = params_fingerprint(params)
    self.method = setup.method_from(cfg.method)
    rng = jax.random.key(cfg.seed)
    variables = self.method.init_variables(jax.random.fold_in(rng, 1), params)
    if callable(data) and not hasattr(data, "get_state"):
      self.data = data = data(self.model)  # a factory that needs the model (vocab, images)
    self.method = self._prepare_method(variables, t.get("prepare_batches", 4))
    self.mask, self.n_trainable = build.trainable_mask(self.method, variables)
    self.penalty, consts = penalty_setup.setup_penalty(
        cfg, self.model, self.method, params, variables, base_path=self.base_path,
        base_fingerprint=self.base_fingerprint, fisher_data=fisher_data, train_data=self.data,
        mesh=self.mesh)
    self.penalty_data = penalty_setup.setup_penalty_data(cfg, self.model, self.penalty,
                                                         self.mesh)
    trainable = self._assemble(variables)
    if penalty_refresh.every(self.penalty):  # theta* = the weights as the penalty reads them
      penalty_refresh.check(self.penalty, variables, fisher_data)
      consts["anchor"] = penalty_refresh.current_anchor(self.penalty, trainable, self.frozen)
    self.penalty_consts = self._place_penalty_consts(consts)
    self.state = self._initial_state(trainable, rng)
    state_sh = jax.tree.map(lambda x: x.sharding, self.state)
    self.batch_sharding = setup.batch_sharding(self.mesh, t.grad_accum)
    self.step_shapes: set = set()  # distinct host batch shapes seen (= step programs)
    self.jit_step = jax.jit(self._raw_step, donate_argnums=(1,), out_shardings=(state_sh, None))
    self._step = lambda frozen, state, batch, penalty_batch=None: self.jit_step(
        frozen, state, batch, self.penalty_consts, penalty_batch)
    self._eval = jax.jit(functools.partial(eval_step, self.fns))
    self.run_dir = os.path.abspath(cfg.run_dir)
    self.ckpt = TrainCheckpointer(os.path.join(self.run_dir, "checkpoints"), max_to_keep=t.keep,
                                  best_metric=t.best_metric or None, best_mode=t.best_mode,
                                  async_save=t.async_save)
    self._stop_requested = False
    self.tracker = self._setup_tracking(params, variables)
    del params

  def _assemble(self, variables: dict) -> dict:
    """`build.assemble` with this run's optimizer, dtypes and mesh placement; sets frozen,
    optimizer, fns, lr_fn and the trainable shardings; returns the placed trainable leaves."""
    cfg, t = self.cfg, self.cfg.train
    base_opt, self.lr_fn = setup.make_optimizer(cfg.optimizer, t.steps)
    shardings = {}

    def place(name):  # onto the mesh by the (regex, PartitionSpec) rules
      def put(tree):
        shardings[name] = shard_lib.state_shardings(tree, self.mesh, base=variables)
        return jax.device_put(tree, shardings[name])
      return put
    run = build.assemble(
        self.model, self.method, variables, self.mask, base_opt, penalty=self.penalty,
        grad_accum=t.grad_accum, loss_chunk=t.get("loss_chunk", 256),
        router_aux_loss=t.get("router_aux_loss", 0.0),
        master_dtype=jnp.float32,  # float32 master weights
        frozen_dtype=jnp.dtype(cfg.model.frozen_dtype) if cfg.model.frozen_dtype else None,
        place_trainable=place("trainable"), place_frozen=place("frozen"))
    self.trainable_shardings = shardings["trainable"]
    self.frozen, self.optimizer, self.fns = run.frozen, run.optimizer, run.fns
    return run.trainable

  def _place_penalty_consts(self, consts: dict | None) -> dict | None:
    """The penalty's arrays on the mesh: gift's theta_ref as its trainable leaf, the rest
    (importance, theta0 copies) as the base leaf they belong to."""
    if self.penalty is None:
      return None
    flat_sh = pytree.flatten(self.trainable_shardings)
    where = lambda k, p, x: (flat_sh[p] if k == "ref" else
                             self.param_sharding(p.split("/", 1)[1], tuple(x.shape)))
    return {k: {p: jax.device_put(x, where(k, p, x)) for p, x in d.items()}
            for k, d in consts.items()}

  def _initial_state(self, trainable: dict, rng: jax.Array) -> TrainState:
    """Step 0's state, every leaf committed on the mesh as the step returns it (else the
    first step compiles for other argument shardings)."""
    replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
    mesh_devices = set(self.mesh.devices.flat)

    def on_mesh(x):
      if set(x.sharding.device_set) != mesh_devices:
        return jax.device_put(x, replicated)
      return x if x.committed else jax.device_put(x, x.sharding)
    split = shard_lib.follow(jax.eval_shape(self.optimizer.init, trainable),
                             pytree.flatten(trainable), self.mesh)  # moments split as weights
    opt_state = jax.tree.map(on_mesh, jax.jit(self.optimizer.init, out_shardings=split)(trainable))
    return TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), replicated),
                      trainable=trainable, opt_state=opt_state,
                      rng=jax.device_put(jax.random.key_data(rng), replicated))

  def _setup_tracking(self, params: dict, variables: dict):
    """Target / retention tracking (`tracking.Tracker`) and the recipe's post-hoc step, both
    checked before any training."""
    from mllm_tune.eval.retention import EvalSetError
    from mllm_tune.eval.selection import SelectionError
    from mllm_tune.train import posthoc_step, tracking
    try:
      run = tracking.RunView(self.model, self.method, self.frozen, lambda: self.variables,
                             self.run_dir, self.put_single_batch, self.param_sharding)
      tracker = tracking.Tracker.create(self.cfg, run, params, variables, self.mask)
    except (EvalSetError, SelectionError) as e:
      raise setup.ConfigValueError(str(e)) from e
    ph = self.cfg.get("posthoc")
    if ph is not None and ph.name != "none":
      if tracker is None:
        raise setup.ConfigValueError(
            f"config key 'posthoc.name': the post-hoc step {ph.name!r} picks its value on the "
            "eval sets; set eval.target and eval.retention")
      try:
        posthoc_step.check(ph, self.method, variables)
      except posthoc_step.PosthocError as e:
        raise setup.ConfigValueError(f"config 'posthoc': {e}") from e
    return tracker

  def _prepare_method(self, variables: dict, n_batches: int):
    """Methods that derive their mask from task data (grad_topk) get it here, from the first
    `train.prepare_batches` training batches; the data position is then rewound."""
    if not build.needs_preparing(self.method):
      return self.method
    state0 = self.data.get_state()
    batches = [next(self.data) for _ in range(n_batches)]
    self.data.set_state(state0)
    return build.prepare_method(self.method, self.model, variables, batches)

  def _raw_step(self, frozen, state, batch, penalty_consts=None, penalty_batch=None):
    state = state.replace(rng=jax.random.wrap_key_data(state.rng))
    new, metrics = train_step(self.fns, frozen, state, batch, self.lr_fn, penalty_consts,
                              penalty_batch)
    return new.replace(rng=jax.random.key_data(new.rng)), metrics

  # --------------------------------------------------------------------------- helpers
  @property
  def variables(self) -> dict:
    return tuning.combine(self.state.trainable, self.frozen)

  def put_batch(self, batch: dict, sharding=None, training: bool = False) -> dict:
    """Host batch (this process's slice) -> global arrays on the mesh (`setup.place_batch`);
    for training batches, warns once when the image buffer ends up replicated over several
    data-parallel shards."""
    out, replicated = setup.place_batch(batch, sharding or self.batch_sharding,
                                        self.model.config)
    shards = shard_lib.batch_shards(self.mesh)
    if training and replicated and shards > 1 and not getattr(self, "_warned_images", False):
      self._warned_images = True
      log.warning("image buffer %s is replicated over the %d data-parallel shards: every device "
                  "runs the vision tower on all the batch's images (Qwen: set data.image_groups "
                  "to the shards of a host's rows; LLaVA / anyres: make the image slots / crop "
                  "buckets multiples of %d)", replicated, shards, shards)
    return out

  def put_single_batch(self, batch: dict) -> dict:
    """`put_batch` for batches without a micro-batch axis (eval sets, GIFT captions), whatever
    train.grad_accum is."""
    return self.put_batch(batch, setup.batch_sharding(self.mesh, 1))

  def evaluate(self, batches) -> dict:
    tot = {"nll": 0.0, "tokens": 0.0, "correct": 0.0}
    for b in batches:
      with shard_lib.mesh_context(self.mesh):  # also when called after run()
        r = jax.device_get(self._eval(self.frozen, self.state.trainable,
                                      self.put_single_batch(b)))
      tot = {k: tot[k] + float(r[k]) for k in tot}
    n = max(tot["tokens"], 1.0)
    return {"loss": tot["nll"] / n, "accuracy": tot["correct"] / n,
            "perplexity": float(np.exp(min(tot["nll"] / n, 50.0))), "tokens": tot["tokens"]}

  def _meta(self) -> dict:
    meta = {"base_path": self.base_path, "base_fingerprint": self.base_fingerprint,
            "method": self.cfg.method.to_dict(), "n_trainable": self.n_trainable}
    if self.penalty is not None:
      meta["penalty"] = self.cfg.penalty.to_dict()
    return meta

  def save(self, step: int, metrics: dict | None = None, force: bool = False) -> None:
    self.ckpt.save(step, self.state, self.data.get_state(), self._meta(), metrics, force=force)

  def maybe_restore(self) -> int:
    """Resume from the newest readable checkpoint (`TrainCheckpointer.restore_newest`): the
    step restored, 0 when the run has none."""
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                           sharding=x.sharding), self.state)
    found = self.ckpt.restore_newest(abstract, self.base_fingerprint)
    if found is None:
      return 0
    step, self.state, data_state = found
    self.data.set_state(data_state)
    refreshed = penalty_refresh.on_resume(self, step)
    if refreshed is not None:  # online EWC's F~ and theta* as they were at that step
      self.penalty_consts = refreshed
    log.info("resumed from %s at step %d", self.ckpt.directory, step)
    return step

  def variables_at(self, step: int) -> dict:
    """The run's variables at checkpoint `step` (its trainable state with this frozen base)."""
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                           sharding=x.sharding), self.state)
    state, _, _ = self.ckpt.restore(step, abstract, self.base_fingerprint)
    return tuning.combine(state.trainable, self.frozen)

  def _best_step(self) -> int | None:
    """The run's selected step, the one its report names (`run_report.selected`): with eval
    sets, the best eval step by train.best_metric (empty: the tracker's default, the trade-off
    score O) among the checkpointed ones, ties to the earliest; without eval sets, orbax's best
    checkpoint by train.best_metric; None where there is no selection or it was not
    checkpointed (what `export --best` says, `runs.best_step`)."""
    if self.tracker is None:
      return self.ckpt.best_step() if self.cfg.train.get("best_metric") else None
    from mllm_tune.eval import run_report
    sel = run_report.selected(run_report.load_run(self.run_dir))
    return sel.step if sel.step is not None and sel.among_checkpoints else None

  def _check_finite(self, step: int, metrics: dict, batch: dict) -> None:
    if np.isfinite(float(metrics["loss"])):
      return
    bad_leaves = find_nonfinite(self.state.trainable)
    bad_fields = [k for k, v in batch.items()
                  if np.issubdtype(np.asarray(v).dtype, np.floating)
                  and not np.isfinite(np.asarray(v)).all()]
    raise TrainingError(
        f"non-finite loss ({float(metrics['loss'])}) at step {step}; trainable leaves now "
        f"non-finite: {bad_leaves[:8] or 'none'}; batch fields with NaN/Inf: "
        f"{bad_fields or 'none'}. The last good checkpoint in {self.ckpt.directory} "
        f"(step {self.ckpt.latest_step()}) was kept; this state was not saved.")

  # --------------------------------------------------------------------------- the loop
  def run(self) -> dict:
    with shard_lib.mesh_context(self.mesh):
      return self._run()

  def _run(self) -> dict:
    cfg, t = self.cfg, self.cfg.train
    os.makedirs(self.run_dir, exist_ok=True)
    if self.tracker is None:
      tracking.check_plain_metric(cfg, has_eval_fn=self.eval_fn is not None)
    start = self.maybe_restore()  # a refused resume raises before the run's config is touched
    resume_check.keep_previous(self.run_dir, start, self.resume_changes)
    with open(os.path.join(self.run_dir, "config.json"), "w") as f:
      f.write(cfg.to_json_best_effort(indent=2, sort_keys=True))
    metrics_path = os.path.join(self.run_dir, "metrics.jsonl")
    redone = drop_records_after(metrics_path, start)  # logged again when redone
    if redone:
      log.info("%s: dropped %d record(s) past step %d, which this run redoes", metrics_path,
               redone, start)
    jsonl = JsonlWriter(metrics_path)
    tb = TensorBoardWriter(os.path.join(self.run_dir, "tb"))
    shown = {}  # the progress bar's latest target / retention scores
    if self.tracker is not None:
      rec0 = self.tracker.start(start)
      if rec0 is not None:
        jsonl.write(rec0)
        tb.scalars(0, {k: v for k, v in rec0.items() if k != "step"})
        shown = bar_scores(rec0)
    prev = signal.signal(signal.SIGTERM, self._on_sigterm) if _main_thread() else None
    bar = tqdm(total=t.steps, initial=start, disable=not self.progress, unit="step",
               dynamic_ncols=True)
    last, tokens, t0, status = {}, 0.0, time.time(), "done"
    saved = None  # the last step saved in this loop
    try:
      for step in range(start, t.steps):
        host_batch = next(self.data)
        pb = None
        if self.penalty_data is not None:  # gift: this step's synthetic captions (no A axis)
          pb = self.put_single_batch(self.penalty_data.batch(step))
        self._note_shapes(host_batch, step + 1)
        batch = self.put_batch(host_batch, training=True)
        self.state, metrics = self._step(self.frozen, self.state, batch, pb)
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        metrics["step_programs"] = float(len(self.step_shapes))
        if t.nan_guard:
          self._check_finite(step + 1, metrics, host_batch)
        tokens += metrics["tokens"]
        last = {"step": step + 1, **metrics}
        if step == start:
          tracking.check_logged_metric(t.best_metric, last, evaluated=False)
        if penalty_refresh.due(self.penalty, step + 1, t.steps):  # before this step's save
          self.penalty_consts = self._place_penalty_consts(
              penalty_refresh.refresh_and_save(self, step + 1))
        is_eval = bool(t.eval_every) and ((step + 1) % t.eval_every == 0 or (
            self.tracker is not None and step + 1 == t.steps))
        if is_eval and self.eval_fn is not None:
          last.update({f"eval/{k}": v for k, v in self.eval_fn(self, step + 1).items()})
        if is_eval and self.tracker is not None:
          last.update(self.tracker.evaluate(step + 1))
          shown = bar_scores(last)
        if is_eval and self.tracker is None:
          tracking.check_logged_metric(t.best_metric, last, evaluated=True)
        if (step + 1) % t.log_every == 0 or step + 1 == t.steps or is_eval:
          elapsed = time.time() - t0
          last["tokens_per_s"] = tokens / max(elapsed, 1e-9)
          jsonl.write(last)
          tb.scalars(step + 1, {k: v for k, v in last.items() if k != "step"})
          bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{last['tokens_per_s']:.0f}",
                          **shown)
        bar.update(1)
        if (t.save_every and (step + 1) % t.save_every == 0) or (is_eval and t.best_metric):
          self.save(step + 1, last)
          saved = step + 1
        debug_kill(step + 1, self.ckpt)
        if self._stop_requested:  # SIGTERM: this step's state on disk, then a clean exit
          status = "preempted"
          if saved != step + 1:
            self.save(step + 1, last, force=True)
          break
    finally:
      bar.close()
      jsonl.close()
      tb.close()
      self.ckpt.wait()
      if prev is not None:
        signal.signal(signal.SIGTERM, prev)
    if status == "done" and t.steps and self.ckpt.latest_step() != t.steps:
      self.save(t.steps, last, force=True)
      self.ckpt.wait()
    posthoc = None
    if status == "done" and self.tracker is not None:
      posthoc = self.tracker.finish(t.steps)
    log.info("%d compiled train-step program(s) in this run (one per distinct batch shape)",
             len(self.step_shapes))
    return {"status": status, "last": last, "run_dir": self.run_dir,
            "best_step": self._best_step(), "posthoc": posthoc,
            "step_programs": len(self.step_shapes), "skipped": skipped_by_reason(self.data)}

  def _note_shapes(self, host_batch: dict, step: int) -> None:
    """Count distinct batch shapes: each compiles its own step program (bucketed row lengths
    and, for anyres models, crop counts keep them few)."""
    sig = tuple(sorted((k, np.shape(v)) for k, v in host_batch.items()))
    if sig not in self.step_shapes:
      self.step_shapes.add(sig)
      log.info("step %d: new batch shape #%d (%s): compiling a train-step program", step,
               len(self.step_shapes), ", ".join(f"{k} {tuple(v)}" for k, v in sig
                                                if k in ("input_ids", "pixel_values")))

  def _on_sigterm(self, signum, frame):
    del signum, frame
    log.warning("SIGTERM: saving a checkpoint at the end of this step, then exiting")
    self._stop_requested = True


def _main_thread() -> bool:
  import threading
  return threading.current_thread() is threading.main_thread()
