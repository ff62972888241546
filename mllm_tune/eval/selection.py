"""Trade-off scores of an in-run evaluation and checkpoint selection by them.

An eval record (one line of a run's `metrics.jsonl`) holds `eval/target/<set>` and
`eval/retention/<set>` task scores (percent). Against the step-0 record (the base θ0) the
benchmark protocol of docs/methods.md §8 (`eval/tradeoff.py`) gives, with the sets as its downstream
/ general sets:
  tradeoff/A_down = mean_d target_d          tradeoff/A_up = mean_r retention_r
  tradeoff/E = A_down − A_down(θ0)           tradeoff/F = mean_r [retention_r − retention_r(θ0)]
  tradeoff/O = E + F                         tradeoff/H = 2·A_down·A_up / (A_down + A_up)
  tradeoff/weighted = w_t·E + w_r·F          (user weights; (1, 1) equals O)
`select_step` picks the eval step that is best by one of these (or by any other logged eval
metric); ties go to the earliest step. Pure functions; the loop and the report call them.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

from mllm_tune.eval.tradeoff import efoh

TARGET, RETENTION = "eval/target/", "eval/retention/"
TRADEOFF_KEYS = ("tradeoff/A_down", "tradeoff/A_up", "tradeoff/E", "tradeoff/F", "tradeoff/O",
                 "tradeoff/H", "tradeoff/weighted")
# selection metric -> natural direction
SELECTION_MODES = {"tradeoff/O": "max", "tradeoff/weighted": "max", "tradeoff/H": "max",
                   "tradeoff/E": "max", "tradeoff/F": "max", "tradeoff/A_down": "max",
                   "tradeoff/A_up": "max"}


class SelectionError(ValueError):
  """Unknown selection metric, or records that cannot be scored."""


def _get(record: Mapping[str, float], key: str, what: str) -> float:
  if key not in record:
    raise SelectionError(f"{what} lacks '{key}' (has: {sorted(k for k in record if '/' in k)[:8]})")
  v = float(record[key])
  if not math.isfinite(v):
    raise SelectionError(f"{what}: '{key}' is {v}")
  return v


def tradeoff_metrics(current: Mapping[str, float], reference: Mapping[str, float],
                     target: Sequence[str], retention: Sequence[str],
                     weights: Sequence[float] = (1.0, 1.0)) -> dict[str, float]:
  """`tradeoff/*` scores of `current` against `reference` (the step-0 eval of θ0)."""
  if not target or not retention:
    raise SelectionError(f"trade-off scores need target and retention sets, got target "
                         f"{list(target)} and retention {list(retention)}")
  if len(weights) != 2:
    raise SelectionError(f"weights must be (w_target, w_retention), got {tuple(weights)}")
  t = [_get(current, TARGET + s, "this eval") for s in target]
  t0 = [_get(reference, TARGET + s, "the reference (step-0) eval") for s in target]
  r = [_get(current, RETENTION + s, "this eval") for s in retention]
  r0 = [_get(reference, RETENTION + s, "the reference (step-0) eval") for s in retention]
  a_down, a_up = sum(t) / len(t), sum(r) / len(r)
  s = efoh(a_down, sum(t0) / len(t0), a_up, sum(x - x0 for x, x0 in zip(r, r0)) / len(r))
  out = {"tradeoff/A_down": a_down, "tradeoff/A_up": a_up}
  out.update({f"tradeoff/{k}": v for k, v in s.items()})
  out["tradeoff/weighted"] = float(weights[0]) * s["E"] + float(weights[1]) * s["F"]
  return out


def check_metric(metric: str, mode: str, eval_keys: Sequence[str] = ()) -> str:
  """The selection metric's mode ('max' / 'min'), or SelectionError naming the known ones.
  `eval_keys`: the other `eval/...` keys this run logs (e.g. `eval/retention/general/kl`)."""
  known = list(SELECTION_MODES) + list(eval_keys)
  if metric not in known:
    raise SelectionError(f"unknown selection metric {metric!r}; choose one of {known}")
  if mode not in ("max", "min"):
    raise SelectionError(f"selection mode must be 'max' or 'min', got {mode!r}")
  return mode


def eval_records(records: Sequence[Mapping[str, float]]) -> list[dict]:
  """The eval records of a metrics log, one per step (a resumed run's later line for a step
  wins), in step order."""
  by_step: dict[int, dict] = {}
  for r in records:
    if any(k.startswith(TARGET) or k.startswith(RETENTION) for k in r):
      by_step[int(r["step"])] = dict(r)
  return [by_step[s] for s in sorted(by_step)]


def select_step(records: Sequence[Mapping[str, float]], metric: str = "tradeoff/O",
                mode: str = "max", steps: Sequence[int] | None = None) -> tuple[int, float]:
  """(step, value) of the best eval record by `metric` (ties: the earliest step). `steps`
  restricts the choice (e.g. to steps that have a checkpoint; step 0 has none)."""
  check_metric(metric, mode, [k for r in records for k in r if k.startswith("eval/")])
  best = None
  for r in eval_records(records):
    if steps is not None and int(r["step"]) not in steps:
      continue
    if metric not in r:
      continue
    v = float(r[metric])
    if not math.isfinite(v):
      continue
    if best is None or (v > best[1] if mode == "max" else v < best[1]):
      best = (int(r["step"]), v)
  if best is None:
    raise SelectionError(f"no eval record has a finite '{metric}'"
                         + (f" among steps {sorted(steps)}" if steps is not None else ""))
  return best
