"""Report of one training run (or an overlay of several) from its in-run evaluations.

Reads a run directory: `metrics.jsonl` (training and eval lines; a resumed run's later line for a
step wins), `retention.json` (target / retention sets, selection metric, weights), the optional
`posthoc.json` (a post-hoc step such as WiSE-FT and its candidates) and `checkpoints/<step>/`.
Writes `report.md` (per-eval-step table, the selected checkpoint and why, the post-hoc step) and
`report.png` (scores vs step; the A_down / A_up trade-off path) — or, for several runs,
`overlay.md` / `overlay.png`. Selection uses `eval/selection.py` (`eval_records`, `select_step`).

Without `retention.json` the sets are inferred from the `eval/target/<set>` and
`eval/retention/<set>` keys, selection is `tradeoff/O` (max), weights (1, 1), and the reference is
the first eval step. Missing `tradeoff/*` keys are computed against the reference eval.
Pure functions, except `plot` and `write_*` (files).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping, Sequence

from mllm_tune.eval import selection as S
from mllm_tune.eval.tradeoff import agg_figure, save_png

__all__ = ["ReportError", "RunLog", "Selected", "load_run", "selected", "markdown",
           "overlay_markdown", "plot", "write_report", "write_overlay", "report_command"]

_EFO = [("E", "tradeoff/E"), ("F", "tradeoff/F"), ("O", "tradeoff/O")]
_SUMMARY = [("A_down", "tradeoff/A_down"), ("A_up", "tradeoff/A_up")] + _EFO


class ReportError(ValueError):
  """A run directory that cannot be reported (the message names the file)."""


@dataclasses.dataclass
class RunLog:
  run_dir: str
  name: str
  records: list[dict]  # eval records, one per step, in step order
  target: tuple[str, ...]
  retention: tuple[str, ...]
  metric: str = "tradeoff/O"
  mode: str = "max"
  weights: tuple[float, float] = (1.0, 1.0)
  posthoc: dict | None = None
  checkpoint_steps: list[int] = dataclasses.field(default_factory=list)
  reference_step: int = 0
  inferred: bool = False  # True when retention.json was missing


@dataclasses.dataclass(frozen=True)
class Selected:
  step: int | None  # None: nothing could be selected (`note` says why)
  value: float | None
  among_checkpoints: bool
  note: str = ""


# ----------------------------------------------------------------------------- loading
def _read_json(path: str) -> Any:
  try:
    with open(path) as fh:
      return json.load(fh)
  except json.JSONDecodeError as e:
    raise ReportError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from e


def _read_jsonl(path: str) -> list[dict]:
  out = []
  with open(path) as fh:
    for n, line in enumerate(fh, 1):
      if not line.strip():
        continue
      try:
        rec = json.loads(line)
      except json.JSONDecodeError as e:
        raise ReportError(f"{path}:{n}: malformed JSON line ({e.msg})") from e
      if not isinstance(rec, dict):
        raise ReportError(f"{path}:{n}: expected a JSON object, got {type(rec).__name__}")
      if "step" not in rec:
        if any(k.startswith(("eval/", "tradeoff/")) for k in rec):
          raise ReportError(f"{path}:{n}: eval record without a 'step'")
        continue
      out.append(rec)
  return out


def _set_names(records: Sequence[Mapping[str, Any]], prefix: str) -> tuple[str, ...]:
  names = {k[len(prefix):] for r in records for k in r if k.startswith(prefix)}
  return tuple(sorted(n for n in names if n and "/" not in n))


def _checkpoint_steps(run_dir: str) -> list[int]:
  d = os.path.join(run_dir, "checkpoints")
  if not os.path.isdir(d):
    return []
  return sorted(int(n) for n in os.listdir(d) if n.isdigit() and os.path.isdir(os.path.join(d, n)))


def _with_tradeoff(metrics: Mapping[str, Any], ref: Mapping[str, Any] | None,
                   target: Sequence[str], retention: Sequence[str],
                   weights: Sequence[float]) -> dict:
  """`metrics` plus any `tradeoff/*` key it lacks, computed against `ref` (logged keys win)."""
  out = dict(metrics)
  if ref is None or all(k in out for k in S.TRADEOFF_KEYS):
    return out
  try:
    for k, v in S.tradeoff_metrics(out, ref, target, retention, weights).items():
      out.setdefault(k, v)
  except S.SelectionError:
    pass
  return out


def load_run(run_dir: str | os.PathLike) -> RunLog:
  """The eval records and settings of a run directory; ReportError naming the file if not."""
  run_dir = os.path.normpath(os.fspath(run_dir))
  if not os.path.isdir(run_dir):
    raise ReportError(f"run directory {run_dir} does not exist")
  path = os.path.join(run_dir, "metrics.jsonl")
  if not os.path.isfile(path):
    raise ReportError(f"{path} not found: is {run_dir} a training run directory?")
  records = S.eval_records(_read_jsonl(path))
  if not records:
    raise ReportError(f"{path} has no evaluation records: set train.eval_every and "
                      "eval.target / eval.retention")
  cfg_path = os.path.join(run_dir, "retention.json")
  inferred = not os.path.isfile(cfg_path)
  cfg = {} if inferred else _read_json(cfg_path)
  if not isinstance(cfg, dict):
    raise ReportError(f"{cfg_path}: expected a JSON object")
  sel = cfg.get("select") or {}
  target = tuple(cfg.get("target") or _set_names(records, S.TARGET))
  retention = tuple(cfg.get("retention") or _set_names(records, S.RETENTION))
  weights = tuple(float(w) for w in cfg.get("weights", (1.0, 1.0)))
  if len(weights) != 2:
    raise ReportError(f"{cfg_path}: weights must be [w_target, w_retention], got {weights}")
  ref_step = int(cfg.get("reference_step", records[0]["step"]))
  ref = next((r for r in records if int(r["step"]) == ref_step), None)
  records = [_with_tradeoff(r, ref, target, retention, weights) for r in records]
  posthoc_path = os.path.join(run_dir, "posthoc.json")
  posthoc = _read_json(posthoc_path) if os.path.isfile(posthoc_path) else None
  if posthoc is not None:
    if not isinstance(posthoc, dict):
      raise ReportError(f"{posthoc_path}: expected a JSON object")
    fill = lambda m: _with_tradeoff(m, ref, target, retention, weights)  # noqa: E731
    posthoc.update({k: fill(posthoc[k]) for k in ("before", "after")
                    if isinstance(posthoc.get(k), dict)})
    for c in posthoc.get("candidates") or []:
      if isinstance(c, dict) and isinstance(c.get("metrics"), dict):
        c["metrics"] = fill(c["metrics"])
  return RunLog(run_dir=run_dir, name=os.path.basename(run_dir), records=records, target=target,
                retention=retention, metric=str(sel.get("metric", "tradeoff/O")),
                mode=str(sel.get("mode", "max")), weights=weights, posthoc=posthoc,
                checkpoint_steps=_checkpoint_steps(run_dir), reference_step=ref_step,
                inferred=inferred)


# ----------------------------------------------------------------------------- analysis
def selected(run: RunLog) -> Selected:
  """The best eval step by the run's metric among checkpointed steps (all eval steps if the run
  has no checkpoint with an eval)."""
  eval_steps = {int(r["step"]) for r in run.records}
  ckpt = [s for s in run.checkpoint_steps if s in eval_steps]
  note = ("" if ckpt else "no checkpoint step has an eval" if run.checkpoint_steps
          else "the run has no checkpoints")
  try:
    step, value = S.select_step(run.records, run.metric, run.mode, steps=ckpt or None)
  except S.SelectionError as e:
    return Selected(None, None, bool(ckpt), str(e))
  return Selected(step, value, bool(ckpt), note)


def _get(r: Mapping[str, Any] | None, key: str) -> float | None:
  v = None if r is None else r.get(key)
  return None if v is None else float(v)


def _fmt(v: float | None) -> str:
  return "–" if v is None else f"{v:.2f}"


def _target_mean(run: RunLog, r: Mapping[str, Any]) -> float | None:
  vals = [_get(r, S.TARGET + s) for s in run.target]
  return None if not vals or None in vals else sum(vals) / len(vals)


def _record(run: RunLog, step: int | None) -> dict | None:
  return next((r for r in run.records if int(r["step"]) == step), None)


def _best_target_step(run: RunLog, steps: Sequence[int] | None) -> int | None:
  """The step with the highest mean target score (ties: the earliest) among `steps`."""
  cand = [(m, -int(r["step"])) for r in run.records if (m := _target_mean(run, r)) is not None
          and math.isfinite(m) and (steps is None or int(r["step"]) in steps)]
  return -max(cand)[1] if cand else None


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"


def _has(run: RunLog, key: str) -> bool:
  return any(key in r for r in run.records)


def _score_cols(run: RunLog) -> list[tuple[str, str]]:
  """(column, key) of each target and retention set's task score."""
  return ([(f"target {s}", S.TARGET + s) for s in run.target]
          + [(f"retention {s}", S.RETENTION + s) for s in run.retention])


# ----------------------------------------------------------------------------- markdown
def _eval_table(run: RunLog, sel_step: int | None) -> str:
  cols = (_score_cols(run) + [(f"KL {s}", f"{S.RETENTION}{s}/kl") for s in run.retention
                              if _has(run, f"{S.RETENTION}{s}/kl")] + _EFO
          + ([("weighted", "tradeoff/weighted")] if tuple(run.weights) != (1.0, 1.0) else []))
  share = _has(run, "time/eval_share")
  rows = []
  for r in run.records:
    step = int(r["step"])
    row = [f"**{step}**" if step == sel_step else str(step)]
    row += [_fmt(_get(r, k)) for _, k in cols]
    if share:
      v = _get(r, "time/eval_share")
      row.append(_fmt(None if v is None else 100.0 * v))
    rows.append(row)
  return _table(["step"] + [c for c, _ in cols] + (["eval time %"] if share else []), rows)


def _efo(run: RunLog, r: Mapping[str, Any] | None) -> str:
  return (f"{run.metric} = {_fmt(_get(r, run.metric))} (E = {_fmt(_get(r, 'tradeoff/E'))}, "
          f"F = {_fmt(_get(r, 'tradeoff/F'))})")


def _selection_text(run: RunLog, sel: Selected) -> str:
  if sel.step is None:
    return f"No step could be selected by {run.metric} ({run.mode}): {sel.note}.\n"
  rec, last = _record(run, sel.step), run.records[-1]
  ckpt = [s for s in run.checkpoint_steps if _record(run, s) is not None]
  among = (f"the {len(ckpt)} checkpointed eval steps" if sel.among_checkpoints
           else f"all eval steps ({sel.note})")
  best_t = _best_target_step(run, ckpt if sel.among_checkpoints else None)
  word = "highest" if run.mode == "max" else "lowest"
  text = (f"**Step {sel.step}** wins: it has the {word} {run.metric} among {among}, "
          f"{_efo(run, rec)}. ")
  others = []
  if int(last["step"]) != sel.step:
    others.append(f"the last eval step {int(last['step'])} has {_efo(run, last)}")
  if best_t is not None and best_t != sel.step:
    others.append(f"the step with the best target score, {best_t} (mean target "
                  f"{_fmt(_target_mean(run, _record(run, best_t)))}), has "
                  f"{_efo(run, _record(run, best_t))}")
  if others:
    text += "By comparison, " + "; ".join(others) + "."
  else:
    text += "It is also the last eval step and the step with the best target score."
  return text + "\n"


def _posthoc_text(run: RunLog) -> str:
  ph = run.posthoc or {}
  name, param = ph.get("name", "post-hoc"), ph.get("param", "value")
  psel = ph.get("select") or {}
  metric, mode = psel.get("metric", run.metric), psel.get("mode", run.mode)
  extra = [] if metric in dict(_EFO).values() else [(metric, metric)]
  cols = _score_cols(run) + _EFO + extra
  chosen = ph.get("chosen")
  rows = []
  for c in ph.get("candidates") or []:
    v, m = _get(c, "value"), c.get("metrics") or {}
    is_chosen = chosen is not None and v is not None and math.isclose(v, float(chosen))
    rows.append([f"**{_fmt(v)}**" if is_chosen else _fmt(v)] + [_fmt(_get(m, k)) for _, k in cols])
  out = [f"## Post-hoc step: {name}\n"]
  if rows:
    out.append(_table([param] + [c for c, _ in cols], rows))
  src = f" to the checkpoint of step {ph['from_step']}" if "from_step" in ph else ""
  out.append(f"Chosen {param} = {_fmt(_get(ph, 'chosen'))} (by {metric}, {mode}), applied{src}.\n")
  rows = [[w] + [_fmt(_get(ph.get(w), k)) for _, k in _SUMMARY] for w in ("before", "after")]
  out.append(_table(["", *(c for c, _ in _SUMMARY)], rows))
  return "\n".join(out)


def markdown(run: RunLog) -> str:
  """The run's report: sets, per-eval-step table, selected checkpoint, post-hoc step."""
  sel = selected(run)
  head = (f"# Run report: {run.name}\n\n"
          f"Target sets: {', '.join(run.target) or '–'}; retention sets: "
          f"{', '.join(run.retention) or '–'}; selection: {run.metric} ({run.mode}); "
          f"weights (target, retention): {tuple(run.weights)}; reference: step "
          f"{run.reference_step}.\n")
  if run.inferred:
    head += ("\nNo retention.json: sets inferred from the metric keys, selection by "
             "tradeoff/O (max).\n")
  parts = [head, "## Evaluations\n\nScores in percent; the selected step in bold.\n",
           _eval_table(run, sel.step), "## Selected checkpoint\n", _selection_text(run, sel)]
  if run.posthoc is not None:
    parts.append(_posthoc_text(run))
  return "\n".join(parts)


# ----------------------------------------------------------------------------- plot
def plot(runs: Sequence[RunLog], path: str | os.PathLike,
         size_px: tuple[int, int] = (1200, 500), dpi: int = 100) -> str:
  """PNG of exactly `size_px`: target (solid) / retention (dashed) scores vs step, and the
  A_down / A_up trade-off path (selected step starred, post-hoc before -> after arrowed)."""
  import matplotlib
  fig = agg_figure(size_px, dpi, "plot")
  left, right = fig.subplots(1, 2)
  colors = matplotlib.colormaps["tab10"]
  for i, run in enumerate(runs):
    c = colors(i % 10)
    for sets, prefix, ls in ((run.target, S.TARGET, "-"), (run.retention, S.RETENTION, "--")):
      for j, s in enumerate(sets):
        pts = [(int(r["step"]), float(r[prefix + s])) for r in run.records if prefix + s in r]
        if pts:
          left.plot(*zip(*pts), ls=ls, marker="o^sv<>Dp"[j % 8], ms=3, color=c,
                    label=f"{run.name}: {prefix[5:]}{s}")
    path_pts = [(int(r["step"]), r["tradeoff/A_down"], r["tradeoff/A_up"]) for r in run.records
                if "tradeoff/A_down" in r and "tradeoff/A_up" in r]
    if path_pts:
      right.plot(*list(zip(*path_pts))[1:], "-o", ms=3, color=c, label=run.name)
      stride = max(1, math.ceil(len(path_pts) / 10))
      sel = selected(run).step
      for k, (s, x, y) in enumerate(path_pts):
        if k % stride == 0 or k == len(path_pts) - 1 or s == sel:
          right.annotate(str(s), (x, y), xytext=(4, 4), textcoords="offset points", fontsize=7)
        if s == sel:
          right.plot([x], [y], marker="*", ms=15, color=c, mec="k", ls="none")
    ph = run.posthoc or {}
    b = [_get(ph.get("before"), k) for k in ("tradeoff/A_down", "tradeoff/A_up")]
    a = [_get(ph.get("after"), k) for k in ("tradeoff/A_down", "tradeoff/A_up")]
    if None not in b + a:
      right.annotate("", xy=a, xytext=b, arrowprops={"arrowstyle": "->", "color": c, "lw": 1.5})
      right.plot([a[0]], [a[1]], marker="D", ms=6, color=c, ls="none",
                 label=f"{run.name}: {ph.get('name', 'post-hoc')}")
  left.set(xlabel="step", ylabel="score (%)")
  left.set_title("target (solid) and retention (dashed) vs step", fontsize=10)
  right.set(xlabel="A_down (mean target score)", ylabel="A_up (mean retention score)")
  right.set_title("trade-off path (★ selected step)", fontsize=10)
  right.margins(0.15)
  for ax in (left, right):
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)
  return save_png(fig, path, dpi)


# ----------------------------------------------------------------------------- files
def _write(runs: Sequence[RunLog], text: str, out_dir: str, stem: str) -> dict:
  os.makedirs(out_dir, exist_ok=True)
  paths = {"markdown": os.path.join(out_dir, f"{stem}.md"),
           "plot": os.path.join(out_dir, f"{stem}.png")}
  plot(runs, paths["plot"])
  with open(paths["markdown"], "w") as fh:
    fh.write(f"{text}\n![run {stem}]({stem}.png)\n")
  return paths


def write_report(run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> dict:
  """Writes `report.md` and `report.png` into `out_dir` (default `run_dir`); returns the paths."""
  run = load_run(run_dir)
  return _write([run], markdown(run), os.fspath(out_dir or run.run_dir), "report")


def overlay_markdown(runs: Sequence[RunLog]) -> str:
  """One summary row per run: selected step and its scores, last step's O, post-hoc O."""
  rows = []
  for run in runs:
    sel = selected(run)
    r, last = _record(run, sel.step), run.records[-1]
    after = (run.posthoc or {}).get("after")
    rows.append([run.name, "–" if sel.step is None else str(sel.step), run.metric]
                + [_fmt(_get(r, k)) for _, k in _SUMMARY]
                + [str(int(last["step"])), _fmt(_get(last, "tradeoff/O")),
                   _fmt(_get(after, "tradeoff/O"))])
  return "# Run overlay\n\n" + _table(["run", "selected step", "selected by",
                                       *(c for c, _ in _SUMMARY), "last step", "last O",
                                       "post-hoc O"], rows)


def write_overlay(run_dirs: Sequence[str | os.PathLike], out_dir: str | os.PathLike) -> dict:
  """Writes `overlay.md` (summary table) and `overlay.png` (all runs) into `out_dir`."""
  runs = [load_run(d) for d in run_dirs]
  return _write(runs, overlay_markdown(runs), os.fspath(out_dir), "overlay")


def report_command(run_dirs: Sequence[str], out: str | None = None) -> dict:
  """`mllm-tune report RUN_DIR... [--out DIR]`: one run -> report, several -> overlay."""
  run_dirs = list(run_dirs)
  if not run_dirs:
    raise ReportError("no run directory given")
  if len(run_dirs) == 1:
    return write_report(run_dirs[0], out)
  if out is None:
    raise ReportError("several runs need --out (the directory for overlay.md / overlay.png)")
  return write_overlay(run_dirs, out)
