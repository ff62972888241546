"""Specialization vs retention: scores, multi-seed aggregation, a markdown table and a plot.

Implements the benchmark protocol of docs/methods.md §8 (survey arXiv 2503.04543), from raw
accuracies of the base model θ0 (zero-shot) and the tuned model θ, all in one unit (e.g. percent):
  A_down = mean over downstream sets d of A_d(θ);   Ā_up = mean over general sets u of A_u(θ)
  E = A_down(θ) − A_down(θ0)                        specialization (downstream gain)
  F = mean_u [A_u(θ) − A_u(θ0)]                     stabilization (negative = forgetting)
  O = E + F                                         trade-off ("O-Average")
  forget/u = A_u(θ0) − A_u(θ)                       per-set forgetting (positive = forgot)
  H = 2·A_down·Ā_up / (A_down + Ā_up)               harmonic mean (our addition; 0 if both are 0)
Scores are computed per run (one method, one seed), then reported as mean ± sample std (ddof=1;
std 0 for a single seed, whose table cells show the value alone). `runs.json` keeps the raw
accuracies so any convention can be recomputed.
Pure functions, except `scatter_plot` / `save_report` / `load_runs` (files) at the edge.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping, Sequence

import numpy as np

__all__ = ["RunRecord", "MethodSummary", "Aggregated", "scores", "aggregate", "markdown_table",
           "scatter_plot", "save_report", "load_runs", "ZERO_SHOT"]

ZERO_SHOT = "zero-shot"  # reserved method name of the θ0 row
_RUNS_VERSION = 1
_AXES = {"A_down": "A_down (downstream accuracy of θ)", "E": "E = A_down(θ) − A_down(θ0)",
         "A_up": "Ā_up (mean general accuracy of θ)", "F": "F = mean_u [A_u(θ) − A_u(θ0)]"}


def _finite(x: Any, what: str) -> float:
  if isinstance(x, bool) or not isinstance(x, (int, float, np.floating, np.integer)):
    raise TypeError(f"{what} must be a number, got {type(x).__name__} {x!r}")
  if not math.isfinite(float(x)):
    raise ValueError(f"{what} must be finite, got {x!r}")
  return float(x)


@dataclasses.dataclass(frozen=True)
class RunRecord:
  """One tuning run (one method, one seed) on one base model, with raw accuracies.

  `base_acc` / `tuned_acc` map every set in `downstream` and `general` to the accuracy of θ0 /
  θ (same unit everywhere). `curves` holds optional (step, target score, retention score) points.
  """
  method: str
  seed: int
  base: str                      # base model id; runs of one base share zero-shot accuracies
  trainable_params: int
  total_params: int
  downstream: tuple[str, ...]    # target sets (A_down is their mean)
  general: tuple[str, ...]       # held-out general ("upstream") sets (F, Ā_up, forgetting)
  base_acc: Mapping[str, float]  # zero-shot accuracies A_s(θ0)
  tuned_acc: Mapping[str, float]  # tuned accuracies A_s(θ)
  peak_memory_gib: float | None = None
  step_time_s: float | None = None
  curves: tuple[tuple[int, float, float], ...] | None = None

  def __post_init__(self):
    if not isinstance(self.method, str) or not self.method:
      raise ValueError(f"method must be a non-empty string, got {self.method!r}")
    if self.method == ZERO_SHOT:
      raise ValueError(f"method name {ZERO_SHOT!r} is reserved for the base-model row")
    if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)):
      raise TypeError(f"run {self.method!r}: seed must be an int, got {self.seed!r}")
    name = self.name
    set_ = lambda k, v: object.__setattr__(self, k, v)
    set_("seed", int(self.seed))
    for field in ("downstream", "general"):
      sets = getattr(self, field)
      if isinstance(sets, str):
        raise TypeError(f"{name}: {field} must be a sequence of set names, not a string")
      sets = tuple(sets)
      if not sets:
        kind = "general (upstream) sets: F, Ā_up and H" if field == "general" else \
            "downstream sets: A_down and E"
        raise ValueError(f"{name} has no {kind} are undefined")
      if len(set(sets)) != len(sets):
        raise ValueError(f"{name}: duplicate set name in {field} {sets}")
      set_(field, sets)
    both = set(self.downstream) & set(self.general)
    if both:
      raise ValueError(f"{name}: set(s) {sorted(both)} are both downstream and general")
    declared = self.downstream + self.general
    for field, label in (("base_acc", "zero-shot"), ("tuned_acc", "tuned")):
      acc = getattr(self, field)
      for s in declared:
        if s not in acc:
          kind = "downstream" if s in self.downstream else "general"
          raise ValueError(f"{name} lacks {label} accuracy ({field}) for {kind} set {s!r}")
      extra = [s for s in acc if s not in declared]
      if extra:
        raise ValueError(f"{name}: {field} has set(s) {extra} that are neither downstream "
                         f"{self.downstream} nor general {self.general}")
      set_(field, {s: _finite(acc[s], f"{name}: {field}[{s!r}]") for s in declared})
    for k in ("trainable_params", "total_params"):
      v = getattr(self, k)
      if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
        raise ValueError(f"{name}: {k} must be a non-negative int, got {v!r}")
      set_(k, int(v))
    if self.total_params == 0 or self.trainable_params > self.total_params:
      raise ValueError(f"{name}: need 0 <= trainable_params ({self.trainable_params}) <= "
                       f"total_params ({self.total_params}), total_params > 0")
    for k in ("peak_memory_gib", "step_time_s"):
      v = getattr(self, k)
      if v is not None:
        v = _finite(v, f"{name}: {k}")
        if v < 0:
          raise ValueError(f"{name}: {k} must be >= 0, got {v}")
        set_(k, v)
    if self.curves is not None:
      pts = []
      for i, p in enumerate(self.curves):
        if len(p) != 3:
          raise ValueError(f"{name}: curves[{i}] must be (step, target, retention), got {p!r}")
        pts.append((int(p[0]), _finite(p[1], f"{name}: curves[{i}] target"),
                    _finite(p[2], f"{name}: curves[{i}] retention")))
      set_("curves", tuple(pts))

  @property
  def name(self) -> str:
    """How errors name this run: `run 'lora' seed 0`."""
    return f"run {self.method!r} seed {self.seed}"

  @property
  def trainable_pct(self) -> float:
    """Trainable parameters as a percentage of the total (0..100)."""
    return 100.0 * self.trainable_params / self.total_params

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["downstream"], d["general"] = list(self.downstream), list(self.general)
    d["curves"] = None if self.curves is None else [list(p) for p in self.curves]
    return d

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "RunRecord":
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ValueError(f"unknown run field(s) {unknown} in {d.get('method')!r} "
                       f"seed {d.get('seed')}; known: {sorted(names)}")
    return cls(**d)


def efoh(a_down: float, a_down0: float, a_up: float, f: float) -> dict[str, float]:
  """The trade-off scores from mean accuracies: E = A_down(θ) - A_down(θ0) (specialization),
  F = mean retention change (given), O = E + F, H = harmonic mean of A_down and A_up."""
  e = a_down - a_down0
  h = 0.0 if a_down + a_up == 0 else 2.0 * a_down * a_up / (a_down + a_up)
  return {"E": e, "F": f, "O": e + f, "H": h}


def _score(base: Mapping[str, float], tuned: Mapping[str, float], downstream: Sequence[str],
           general: Sequence[str]) -> dict[str, float]:
  a_down = float(np.mean([tuned[s] for s in downstream], dtype=np.float64))
  a_down0 = float(np.mean([base[s] for s in downstream], dtype=np.float64))
  a_up = float(np.mean([tuned[s] for s in general], dtype=np.float64))
  f = float(np.mean([tuned[s] - base[s] for s in general], dtype=np.float64))
  out = {"A_down": a_down}
  out.update({f"A_d/{s}": float(tuned[s]) for s in downstream})
  out.update({f"A_u/{s}": float(tuned[s]) for s in general})
  out.update({"A_up": a_up, **efoh(a_down, a_down0, a_up, f)})
  out.update({f"forget/{s}": float(base[s] - tuned[s]) for s in general})
  return out


def scores(run: RunRecord) -> dict[str, float]:
  """All scores of one run, float64, keys in a stable order: `A_down`, `A_d/<set>` (each
  downstream set), `A_u/<set>` (each general set), `A_up` (Ā_up), `E`, `F`, `O`, `H`,
  `forget/<set>` (A_u(θ0) − A_u(θ), each general set)."""
  return _score(run.base_acc, run.tuned_acc, run.downstream, run.general)


@dataclasses.dataclass(frozen=True)
class MethodSummary:
  """Mean and std (ddof=1; 0 for one seed) over seeds of every score of `scores`, plus
  `trainable_params`, `trainable_pct` and, when recorded, `peak_memory_gib`, `step_time_s`."""
  method: str
  seeds: tuple[int, ...]
  mean: dict[str, float]
  std: dict[str, float]


@dataclasses.dataclass(frozen=True)
class Aggregated:
  """Per-method summaries (in order of first appearance) and the zero-shot row (scores of θ0:
  E = F = O = 0) for runs on one base with one downstream / general split."""
  base: str
  downstream: tuple[str, ...]
  general: tuple[str, ...]
  zero_shot: dict[str, float]
  methods: dict[str, MethodSummary]


def _check_runs(runs: Sequence[RunRecord]) -> None:
  if not runs:
    raise ValueError("no runs to aggregate")
  for r in runs:
    if not isinstance(r, RunRecord):
      raise TypeError(f"expected RunRecord, got {type(r).__name__}")
  ref, seen = runs[0], {}
  bases = sorted({r.base for r in runs})
  if len(bases) > 1:
    raise ValueError(f"runs mix base models {bases}; a trade-off table compares methods on one "
                     f"base (aggregate each base separately)")
  for r in runs:
    key = (r.method, r.seed)
    if key in seen:
      raise ValueError(f"{r.name} appears twice")
    seen[key] = r
    for field in ("downstream", "general"):
      mine, theirs = set(getattr(r, field)), set(getattr(ref, field))
      for s in getattr(ref, field):
        if s not in mine:
          raise ValueError(f"{r.name} lacks {field} set {s!r} that {ref.name} has")
      for s in getattr(r, field):
        if s not in theirs:
          raise ValueError(f"{ref.name} lacks {field} set {s!r} that {r.name} has")
    for s in ref.downstream + ref.general:
      a, b = ref.base_acc[s], r.base_acc[s]
      if not math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12):
        raise ValueError(f"zero-shot accuracy on set {s!r} differs between {ref.name} ({a!r}) "
                         f"and {r.name} ({b!r}) on the same base {r.base!r}")


def aggregate(runs: Sequence[RunRecord]) -> Aggregated:
  """Mean and sample std (ddof=1 when n > 1, else 0) of every score per method, plus the
  zero-shot row. Raises ValueError naming the run and set on inconsistent runs."""
  runs = list(runs)
  _check_runs(runs)
  ref = runs[0]
  by_method: dict[str, list[RunRecord]] = {}
  for r in runs:
    by_method.setdefault(r.method, []).append(r)
  methods = {}
  for m, rs in by_method.items():
    rows = [dict(scores(r), trainable_params=float(r.trainable_params),
                 trainable_pct=r.trainable_pct) for r in rs]
    for k in ("peak_memory_gib", "step_time_s"):
      have = [getattr(r, k) is not None for r in rs]
      if any(have) and not all(have):
        raise ValueError(f"{rs[have.index(False)].name} lacks {k} that "
                         f"{rs[have.index(True)].name} has")
      if all(have):
        for row, r in zip(rows, rs):
          row[k] = getattr(r, k)
    mean, std = {}, {}
    for k in rows[0]:
      v = np.asarray([row[k] for row in rows], dtype=np.float64)
      mean[k] = float(v.mean())
      std[k] = float(v.std(ddof=1)) if len(v) > 1 else 0.0
    methods[m] = MethodSummary(m, tuple(r.seed for r in rs), mean, std)
  zero = _score(ref.base_acc, ref.base_acc, ref.downstream, ref.general)
  zero.update(trainable_params=0.0, trainable_pct=0.0)
  return Aggregated(ref.base, ref.downstream, ref.general, zero, methods)


def _columns(agg: Aggregated, forgetting: bool) -> list[tuple[str, str]]:
  """(score key, header) pairs in table order."""
  cols = [("trainable_params", "trainable"), ("trainable_pct", "trainable %"),
          ("A_down", "A_down")]
  if len(agg.downstream) > 1:
    cols += [(f"A_d/{s}", f"A_d {s}") for s in agg.downstream]
  cols += [(f"A_u/{s}", f"A_u {s}") for s in agg.general]
  cols += [("A_up", "Ā_up"), ("E", "E"), ("F", "F"), ("O", "O"), ("H", "H")]
  if forgetting:
    cols += [(f"forget/{s}", f"forget {s}") for s in agg.general]
  for k, h in (("peak_memory_gib", "peak mem (GiB)"), ("step_time_s", "step (s)")):
    if any(k in s.mean for s in agg.methods.values()):
      cols.append((k, h))
  return cols


def _cell(key: str, mean: Mapping[str, float], std: Mapping[str, float] | None,
          digits: int) -> str:
  if key not in mean:
    return "—"
  m, s = mean[key], (std or {}).get(key, 0.0)
  if key == "trainable_params":
    return f"{round(m):,}" + (f" ± {round(s):,}" if s else "")
  if key == "trainable_pct":
    return f"{m:.3g}%" + (f" ± {s:.2g}" if s else "")
  num = lambda v: f"{v:.{digits}f}".lstrip("-") if round(v, digits) == 0 else f"{v:.{digits}f}"
  return num(m) if std is None else f"{num(m)} ± {num(s)}"


def markdown_table(agg: Aggregated, *, digits: int = 2, forgetting: bool = False) -> str:
  """Markdown table: the zero-shot row then one row per method, cells `mean ± std` over seeds
  (`digits` decimals), then a legend with the definitions and sign convention. `forgetting=True`
  adds per-set forgetting columns."""
  cols = _columns(agg, forgetting)
  esc = lambda t: str(t).replace("|", "\\|")
  lines = ["| " + " | ".join(["method", "seeds"] + [esc(h) for _, h in cols]) + " |",
           "|" + "|".join(["---"] * 2 + ["---:"] * len(cols)) + "|"]
  zero = [ZERO_SHOT, "—"] + ["—" if k in ("peak_memory_gib", "step_time_s")
                            else _cell(k, agg.zero_shot, None, digits) for k, _ in cols]
  lines.append("| " + " | ".join(zero) + " |")
  for s in agg.methods.values():
    std = s.std if len(s.seeds) > 1 else None  # one seed: its values, no spread
    row = [esc(s.method), str(len(s.seeds))] + [_cell(k, s.mean, std, digits) for k, _ in cols]
    lines.append("| " + " | ".join(row) + " |")
  lines += ["", f"Base `{agg.base}`; downstream sets: {', '.join(agg.downstream)}; general "
            f"(upstream) sets: {', '.join(agg.general)}. A_down = mean downstream accuracy of θ; "
            "Ā_up = mean of the A_u; E = A_down(θ) − A_down(θ0) (specialization); "
            "F = mean_u [A_u(θ) − A_u(θ0)] (stabilization, negative = forgetting); O = E + F; "
            "forget u = A_u(θ0) − A_u(θ) (positive = forgot); H = 2·A_down·Ā_up/(A_down + Ā_up). "
            "Cells: mean ± sample std (ddof=1) over seeds (a method run with one seed: its "
            "value); θ0 = zero-shot base model."]
  return "\n".join(lines) + "\n"


def scatter_plot(agg: Aggregated, path: str | os.PathLike, *, x: str = "A_down",
                 y: str = "A_up", size_px: tuple[int, int] = (800, 600), dpi: int = 100) -> str:
  """PNG of specialization (`x`: "A_down" or "E") vs retention (`y`: "A_up" or "F"), one point
  per method with ±std error bars over seeds, the zero-shot point as a star, and an arrow to the
  ideal (upper-right) corner. Exactly `size_px` (width, height) pixels. Returns the path."""
  if x not in ("A_down", "E") or y not in ("A_up", "F"):
    raise ValueError(f"x must be 'A_down' or 'E' and y 'A_up' or 'F', got x={x!r}, y={y!r}")
  import matplotlib
  fig = agg_figure(size_px, dpi, "scatter_plot")
  ax = fig.add_subplot()
  zx, zy = agg.zero_shot[x], agg.zero_shot[y]
  ax.axvline(zx, color="0.75", ls="--", lw=0.8)
  ax.axhline(zy, color="0.75", ls="--", lw=0.8)
  if (x, y) == ("E", "F"):
    ax.axline((0.0, 0.0), slope=-1.0, color="0.6", ls=":", lw=0.8, label="O = E + F = 0")
  colors = matplotlib.colormaps["tab10"]
  for i, s in enumerate(agg.methods.values()):
    mx, my = s.mean[x], s.mean[y]
    ax.errorbar(mx, my, xerr=s.std[x], yerr=s.std[y], fmt="o", color=colors(i % 10), capsize=3,
                label=f"{s.method} (n={len(s.seeds)})")
    ax.annotate(s.method, (mx, my), xytext=(5, 5), textcoords="offset points", fontsize=8)
  ax.plot([zx], [zy], marker="*", ms=14, color="k", ls="none", label=ZERO_SHOT)
  ax.annotate(ZERO_SHOT, (zx, zy), xytext=(5, -12), textcoords="offset points", fontsize=8)
  ax.annotate("ideal direction", xy=(0.97, 0.97), xytext=(0.84, 0.84), xycoords="axes fraction",
              textcoords="axes fraction", ha="right", va="top", fontsize=9,
              arrowprops={"arrowstyle": "->", "color": "tab:green"}, color="tab:green")
  ax.margins(0.15)
  ax.set_xlabel(_AXES[x])
  ax.set_ylabel(_AXES[y])
  ax.set_title(f"specialization vs retention — {agg.base}", fontsize=10)
  ax.legend(fontsize=7, loc="lower left")
  ax.grid(alpha=0.3)
  return save_png(fig, path, dpi)


def agg_figure(size_px: tuple[int, int], dpi: int, who: str):
  """A matplotlib Figure of exactly `size_px` pixels on an Agg canvas (no display, no pyplot
  state); `who` names the caller in the error when matplotlib is missing."""
  try:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
  except ImportError as e:  # pragma: no cover
    raise ImportError(f"{who} needs matplotlib (pip install 'matplotlib>=3.8')") from e
  w, h = size_px
  fig = Figure(figsize=(w / dpi, h / dpi), dpi=dpi)
  FigureCanvasAgg(fig)
  return fig


def save_png(fig, path: str | os.PathLike, dpi: int) -> str:
  fig.tight_layout()
  path = os.fspath(path)
  fig.savefig(path, dpi=dpi, format="png")
  return path


def save_report(runs: Sequence[RunRecord], out_dir: str | os.PathLike, *, x: str = "A_down",
                y: str = "A_up", digits: int = 2) -> dict[str, str]:
  """Writes `runs.json` (raw records), `tradeoff.md` (table) and `tradeoff.png` (plot) into
  `out_dir`; returns {"runs", "markdown", "plot"} -> path."""
  runs = list(runs)
  agg = aggregate(runs)  # validate before writing anything
  os.makedirs(out_dir, exist_ok=True)
  paths = {k: os.path.join(os.fspath(out_dir), f) for k, f in
           (("runs", "runs.json"), ("markdown", "tradeoff.md"), ("plot", "tradeoff.png"))}
  with open(paths["runs"], "w") as fh:
    json.dump({"version": _RUNS_VERSION, "runs": [r.to_dict() for r in runs]}, fh, indent=1,
              ensure_ascii=False)
  scatter_plot(agg, paths["plot"], x=x, y=y)
  with open(paths["markdown"], "w") as fh:
    fh.write(f"# Specialization vs retention ({agg.base})\n\n"
             + markdown_table(agg, digits=digits, forgetting=True)
             + "\n![specialization vs retention](tradeoff.png)\n")
  return paths


def load_runs(path: str | os.PathLike) -> list[RunRecord]:
  """Run records from a `runs.json` written by `save_report` (or the directory holding it)."""
  path = os.fspath(path)
  if os.path.isdir(path):
    path = os.path.join(path, "runs.json")
  with open(path) as fh:
    data = json.load(fh)
  if not isinstance(data, dict) or data.get("version") != _RUNS_VERSION or "runs" not in data:
    raise ValueError(f"{path} is not a runs.json of version {_RUNS_VERSION} "
                     f"(expected {{'version': {_RUNS_VERSION}, 'runs': [...]}})")
  return [RunRecord.from_dict(d) for d in data["runs"]]
