"""Retention tracking inside a training run: both sides evaluated as the run goes.

    tracker = Tracker.create(cfg, run, base_params, variables, mask)   # None without eval sets
    tracker.start(step)            # step 0: evaluates θ0 (the reference); resume: reads it back
    metrics = tracker.evaluate(step)   # eval/target/*, eval/retention/*, tradeoff/*, time/*
    tracker.finish()               # post-hoc step (recipes), then the run report

The reference is θ0 (the base without adapters). The step-0 record evaluates the run's own
variables before the first update (with its KL from θ0: 0 for methods that start as the base,
e.g. full fine-tuning; ~1e-9 nats of float rounding for LoRA, whose extra zero term changes how
XLA fuses the matmuls); when that KL is at most `SAME_KL` and every top-1 agrees on every
retention set, θ0's task scores are taken from that record instead of evaluating θ0 again
(`reference_is_step0` in retention.json says which). The reference is
kept in `run_dir/retention.json`, so a resumed run reports forgetting against the same numbers.
θ0 needs a copy of the base leaves the method trains or rewrites (`retention.base_anchor`):
for full fine-tuning, a second copy of the model.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Any, Callable

import jax

from mllm_tune.eval import retention as ret
from mllm_tune.eval import selection

log = logging.getLogger(__name__)
RETENTION_FILE = "retention.json"
SAME_KL = 1e-6  # nats: below this (and full top-1 agreement) the step-0 model is θ0 up to rounding
POSTHOC_FILE = "posthoc.json"


@dataclasses.dataclass
class RunView:
  """What tracking needs of a run (the Trainer builds it): the model and method, the frozen
  partition, the current variables (read at each eval), where the run writes, how batches are
  put on the mesh and how a base leaf is sharded."""
  model: Any
  method: Any
  frozen: dict
  variables: Callable[[], dict]
  run_dir: str
  put_batch: Callable[[dict], dict]
  param_sharding: Callable[[str, tuple], Any]


# what `Trainer.evaluate` logs for a held-out set (`eval.kind`), under `eval/`
HELD_OUT_KEYS = ("eval/loss", "eval/accuracy", "eval/perplexity", "eval/tokens")
# what the loop adds to a step's record after the step (at logging steps)
LOOP_KEYS = ("tokens_per_s",)


def check_plain_metric(cfg, has_eval_fn: bool = False) -> None:
  """`train.best_metric` of a run without target / retention sets, checked before training:
  a trade-off score needs sets; an `eval/...` name must be one the held-out evaluation
  (`eval.kind`, every `train.eval_every` steps) logs. `has_eval_fn` without `eval.kind`: the
  trainer was given its own `eval_fn` (Python API), whose names are checked at its first
  evaluation. Other names are training metrics, checked at the first step
  (`check_logged_metric`)."""
  metric = cfg.train.best_metric
  if metric.startswith("tradeoff/"):
    raise ret.EvalSetError(f"config key 'train.best_metric': {metric!r} needs eval.target and "
                           "eval.retention sets")
  if not metric.startswith("eval/"):
    return
  e = cfg.get("eval")
  kind = e is not None and e.get("kind")
  if not kind and not has_eval_fn:
    raise ret.EvalSetError(f"config key 'train.best_metric': {metric!r} is an eval metric, but "
                           "the run has no evaluation (set eval.kind for a held-out set, or "
                           "eval.target / eval.retention sets)")
  if kind and metric not in HELD_OUT_KEYS:
    raise ret.EvalSetError(f"config key 'train.best_metric': unknown eval metric {metric!r}; "
                           f"the held-out evaluation logs {list(HELD_OUT_KEYS)}")
  if not cfg.train.eval_every:
    raise ret.EvalSetError(f"config key 'train.eval_every': 0, so the eval metric "
                           f"train.best_metric={metric!r} is never computed")


def check_logged_metric(metric: str, record: dict, evaluated: bool) -> None:
  """A `train.best_metric` must be in the records the run logs: a training metric at the first
  step, an `eval/...` name at the first evaluation (`evaluated`; for a trainer's own `eval_fn`,
  whose names are not known before). Trade-off names were checked before training."""
  if not metric or metric.startswith("tradeoff/") or metric in record or metric in LOOP_KEYS:
    return
  if metric.startswith("eval/") and not evaluated:
    return
  raise ret.EvalSetError(
      f"config key 'train.best_metric': {metric!r} is not a metric this run logs; the "
      f"{'evaluation and ' if evaluated else ''}training step log "
      f"{sorted(k for k in record if k != 'step')}")


class Tracker:
  def __init__(self, cfg, run: RunView, evaluator: ret.Evaluator, anchor: dict):
    self.cfg, self.run, self.evaluator, self.anchor = cfg, run, evaluator, anchor
    e = cfg.eval
    self.weights = tuple(float(w) for w in e.weights)
    t = cfg.train
    self.metric = t.best_metric or "tradeoff/O"
    self.mode = t.best_mode if t.best_metric else "max"
    self.reference: dict | None = None
    self.eval_seconds = 0.0
    self.t_start = time.time()
    self.path = os.path.join(run.run_dir, RETENTION_FILE)

  @classmethod
  def create(cls, cfg, run: RunView, base_params: dict, variables: dict,
             mask: dict) -> "Tracker | None":
    """A tracker when the config names target or retention sets, else None (after checking
    that train.best_metric, if it is a trade-off score, has sets to come from)."""
    e = cfg.get("eval")
    has_sets = e is not None and (len(e.get("target") or {}) or len(e.get("retention") or {}))
    if not has_sets:  # `Trainer.run` checks train.best_metric (it knows its eval_fn)
      if cfg.train.best_metric.startswith("tradeoff/"):
        raise ret.EvalSetError(f"config key 'train.best_metric': {cfg.train.best_metric!r} "
                               "needs eval.target and eval.retention sets")
      return None
    for role in ret.ROLES:
      if not len(e.get(role) or {}):
        raise ret.EvalSetError(f"config key 'eval.{role}': no {role} set (trade-off tracking "
                               "needs at least one target and one retention set)")
    if not cfg.train.eval_every:
      raise ret.EvalSetError("config key 'train.eval_every': eval sets are configured but "
                             "train.eval_every is 0")
    if not hasattr(run.model.config, "image_token_id") or cfg.model.source != "hf":
      raise ret.EvalSetError("config key 'eval': target / retention sets are prepared with "
                             "the tokenizer and image processor of an HF LLaVA directory "
                             f"(model.source=hf or bench), not model.source={cfg.model.source!r}")
    from mllm_tune.data.pipeline import SamplePreparer
    d = cfg.data
    prep = SamplePreparer.from_pretrained(
        cfg.model.path, run.model.config, max(int(d.get("seq_len", 256)), 256),
        d.get("template"), "truncate", d.get("aspect"))
    sets = ret.build_sets(e, prep, ret.offline_image_size(run.model.config, prep))
    evaluator = ret.Evaluator(run.model, sets, prep.chat.tokenizer, prep.image_spec,
                              batch_size=e.batch_size, max_new_tokens=e.max_new_tokens,
                              kl_tokens=e.kl_tokens, put=run.put_batch)
    other = [f"{s.key}/{k}" for s in sets for k in ("loss", "token_acc", "kl", "agree")]
    selection.check_metric(cfg.train.best_metric or "tradeoff/O",
                           cfg.train.best_mode,
                           [s.key for s in sets] + other
                           + (list(HELD_OUT_KEYS) if e.get("kind") else []))
    sfn = run.param_sharding
    anchor = {p: jax.device_put(x, sfn(p.split("/", 1)[1], tuple(x.shape)))
              for p, x in ret.base_anchor(run.method, variables, mask, base_params).items()}
    log.info("tracking %d target and %d retention set(s) (%s); θ0 keeps %d base leaf copies",
             len(evaluator.target), len(evaluator.retention),
             ", ".join(f"{s.name}: {len(s.arrays)}" for s in sets), len(anchor))
    return cls(cfg, run, evaluator, anchor)

  # -------------------------------------------------------------------------------- evals
  @property
  def base_variables(self) -> dict:
    return ret.theta0(self.run.frozen, self.anchor)

  def _tradeoff(self, m: dict) -> dict:
    return selection.tradeoff_metrics(m, self.reference, self.evaluator.target,
                                      self.evaluator.retention, self.weights)

  def _timed(self, fn):
    t0 = time.time()
    out = fn()
    dt = time.time() - t0
    self.eval_seconds += dt
    return out, dt

  def _times(self, dt: float) -> dict:
    return {"time/eval_s": dt,
            "time/eval_share": self.eval_seconds / max(time.time() - self.t_start, 1e-9)}

  def start(self, step: int) -> dict | None:
    """At step 0: evaluate the run before its first update (and θ0 if it differs), write the
    reference; returns the step-0 record. On resume: read the reference back (None)."""
    self.t_start = time.time()
    if step > 0:
      if not os.path.isfile(self.path):
        raise ret.EvalSetError(f"{self.path} is missing: a resumed run needs its step-0 "
                               "reference to report forgetting")
      with open(self.path) as f:
        self.reference = json.load(f)["reference"]
      return None
    base = self.base_variables
    m, dt = self._timed(lambda: self.evaluator(self.run.variables(), base))
    same = all(m[f"{s.key}/kl"] <= SAME_KL and m[f"{s.key}/agree"] == 1.0
               for s in self.evaluator.sets if s.role == "retention")
    if same:
      self.reference = {k: v for k, v in m.items() if k.count("/") == 2}
    else:
      ref, dt0 = self._timed(lambda: self.evaluator(base, None))
      dt += dt0
      self.reference = {k: v for k, v in ref.items() if k.count("/") == 2}
    os.makedirs(self.run.run_dir, exist_ok=True)
    with open(self.path, "w") as f:
      json.dump({"target": self.evaluator.target, "retention": self.evaluator.retention,
                 "select": {"metric": self.metric, "mode": self.mode},
                 "weights": list(self.weights), "reference_step": 0,
                 "reference_is_step0": same, "reference": self.reference}, f, indent=2)
    return {"step": 0, **m, **self._tradeoff(m), **self._times(dt)}

  def evaluate(self, step: int) -> dict:
    del step
    m, dt = self._timed(lambda: self.evaluator(self.run.variables(), self.base_variables))
    return {**m, **self._tradeoff(m), **self._times(dt)}

  def score_params(self, params: dict) -> dict:
    """Metrics of merged base weights (a post-hoc candidate): no adapters."""
    m = self.evaluator({"params": params, "adapters": {}}, self.base_variables)
    return {**m, **self._tradeoff(m)}

  # ------------------------------------------------------------------------------- finish
  def finish(self, last_step: int) -> dict | None:
    """Runs the config's post-hoc step (if any) on the final weights, then writes the run
    report. Returns the post-hoc record."""
    record = None
    ph = self.cfg.get("posthoc")
    if ph is not None and ph.name != "none":
      record = self._posthoc(ph, last_step)
    if self.cfg.eval.get("report", True):
      from mllm_tune.eval.run_report import write_report
      paths = write_report(self.run.run_dir)
      log.info("run report: %s, %s", paths["markdown"], paths["plot"])
    return record

  def _posthoc(self, ph, last_step: int) -> dict:
    from mllm_tune.checkpoints.native import save_native
    from mllm_tune.train import posthoc_step
    tr = self.run
    variables = tr.variables()
    theta0_params = self.base_variables["params"]
    t0 = time.time()
    params, record = posthoc_step.run(ph, tr.method, variables, theta0_params,
                                      self.score_params, self.metric, self.mode)
    record["from_step"] = int(last_step)
    record["seconds"] = time.time() - t0
    out = os.path.join(tr.run_dir, "posthoc")
    save_native(os.path.join(out, "model"), tr.model, params)
    record["model_dir"] = os.path.join(out, "model")
    with open(os.path.join(tr.run_dir, POSTHOC_FILE), "w") as f:
      json.dump(record, f, indent=2)
    log.info("post-hoc %s: %s=%s chosen by %s; before %s, after %s", record["name"],
             record["param"], record["chosen"], self.metric,
             _short(record["before"]), _short(record["after"]))
    return record


def _short(m: dict) -> str:
  return ", ".join(f"{k.split('/')[-1]} {m[k]:.2f}" for k in
                   ("tradeoff/A_down", "tradeoff/A_up", "tradeoff/O") if k in m)

