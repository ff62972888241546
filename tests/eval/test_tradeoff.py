"""Trade-off scores (E, F, O, forgetting, H) vs float64 hand computation, seed aggregation vs
numpy, the markdown table, the PNG plot, the runs.json round trip, and errors on bad input."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from PIL import Image

from mllm_tune.eval import tradeoff as T

DOWN = ("iconqa", "coco")
GEN = ("okvqa", "gqa", "textvqa")
BASE = {"iconqa": 40.0, "coco": 20.0, "okvqa": 50.0, "gqa": 60.0, "textvqa": 30.0}
# method -> seed -> tuned accuracies. "full" gains downstream, loses every general set; "lora"
# gains less and forgets little; "frozen" has a single seed (std 0) and changes nothing general.
TUNED = {
    "full": {0: {"iconqa": 80.0, "coco": 60.0, "okvqa": 40.0, "gqa": 55.0, "textvqa": 25.0},
             1: {"iconqa": 82.0, "coco": 62.0, "okvqa": 42.0, "gqa": 50.0, "textvqa": 26.0},
             2: {"iconqa": 78.0, "coco": 61.0, "okvqa": 41.0, "gqa": 52.0, "textvqa": 24.0}},
    "lora": {0: {"iconqa": 70.0, "coco": 50.0, "okvqa": 49.0, "gqa": 59.0, "textvqa": 30.0},
             1: {"iconqa": 72.5, "coco": 49.0, "okvqa": 50.0, "gqa": 61.0, "textvqa": 29.0},
             2: {"iconqa": 69.0, "coco": 51.5, "okvqa": 48.0, "gqa": 60.0, "textvqa": 31.0}},
    "frozen": {7: {"iconqa": 41.0, "coco": 20.0, "okvqa": 50.0, "gqa": 60.0, "textvqa": 30.0}},
}
PARAMS = {"full": (1000, 1000), "lora": (12, 1000), "frozen": (0, 1000)}


def _run(method, seed, **kw):
  acc = TUNED[method][seed]
  kw = {"method": method, "seed": seed, "base": "tiny-llava", "trainable_params":
        PARAMS[method][0], "total_params": PARAMS[method][1], "downstream": DOWN,
        "general": GEN, "base_acc": dict(BASE), "tuned_acc": dict(acc), **kw}
  return T.RunRecord(**kw)


def _runs(**kw):
  return [_run(m, s, **kw) for m in TUNED for s in TUNED[m]]


def _hand(acc):
  """Scores by plain float64 arithmetic, independent of the module's numpy path."""
  a_down = (acc["iconqa"] + acc["coco"]) / 2.0
  a_down0 = (BASE["iconqa"] + BASE["coco"]) / 2.0
  a_up = (acc["okvqa"] + acc["gqa"] + acc["textvqa"]) / 3.0
  e = a_down - a_down0
  f = ((acc["okvqa"] - BASE["okvqa"]) + (acc["gqa"] - BASE["gqa"])
       + (acc["textvqa"] - BASE["textvqa"])) / 3.0
  out = {"A_down": a_down, "A_d/iconqa": acc["iconqa"], "A_d/coco": acc["coco"],
         "A_u/okvqa": acc["okvqa"], "A_u/gqa": acc["gqa"], "A_u/textvqa": acc["textvqa"],
         "A_up": a_up, "E": e, "F": f, "O": e + f, "H": 2 * a_down * a_up / (a_down + a_up)}
  out.update({f"forget/{s}": BASE[s] - acc[s] for s in GEN})
  return out


# ----------------------------------------------------------------------------- scores
@pytest.mark.parametrize("method,seed", [(m, s) for m in TUNED for s in TUNED[m]])
def test_scores_match_hand_computation(method, seed):
  got, want = T.scores(_run(method, seed)), _hand(TUNED[method][seed])
  assert list(got) == ["A_down", "A_d/iconqa", "A_d/coco", "A_u/okvqa", "A_u/gqa",
                       "A_u/textvqa", "A_up", "E", "F", "O", "H", "forget/okvqa", "forget/gqa",
                       "forget/textvqa"]
  for k in want:
    assert got[k] == pytest.approx(want[k], rel=1e-15, abs=1e-12), k


def test_sign_convention_forgetting_is_negative_f_positive_per_set():
  s = T.scores(_run("full", 0))
  # full seed 0: E = 70 - 30 = 40; F = (-10 - 5 - 5) / 3 < 0; forgetting per set > 0.
  assert s["E"] == 40.0 and s["F"] == pytest.approx(-20.0 / 3) and s["F"] < 0
  assert s["O"] == pytest.approx(40.0 - 20.0 / 3)
  assert (s["forget/okvqa"], s["forget/gqa"], s["forget/textvqa"]) == (10.0, 5.0, 5.0)
  frozen = T.scores(_run("frozen", 7))
  assert frozen["F"] == 0.0 and all(frozen[f"forget/{u}"] == 0.0 for u in GEN)


def test_harmonic_mean_zero_when_both_accuracies_zero():
  zero = {s: 0.0 for s in BASE}
  r = T.RunRecord("m", 0, "b", 1, 2, DOWN, GEN, zero, zero)
  assert T.scores(r)["H"] == 0.0


# ----------------------------------------------------------------------------- aggregate
def test_aggregate_mean_std_match_numpy():
  agg = T.aggregate(_runs())
  assert list(agg.methods) == ["full", "lora", "frozen"]
  assert (agg.downstream, agg.general, agg.base) == (DOWN, GEN, "tiny-llava")
  for m, seeds in TUNED.items():
    summ = agg.methods[m]
    assert summ.seeds == tuple(seeds)
    hands = [_hand(a) for a in seeds.values()]
    for k in hands[0]:
      v = np.array([h[k] for h in hands], dtype=np.float64)
      assert summ.mean[k] == pytest.approx(v.mean(), rel=1e-14, abs=1e-12), (m, k)
      want_std = v.std(ddof=1) if len(v) > 1 else 0.0
      assert summ.std[k] == pytest.approx(want_std, rel=1e-12, abs=1e-12), (m, k)
    assert summ.mean["trainable_params"] == PARAMS[m][0] and summ.std["trainable_params"] == 0
    assert summ.mean["trainable_pct"] == pytest.approx(100.0 * PARAMS[m][0] / PARAMS[m][1])
  assert agg.methods["frozen"].std["E"] == 0.0  # one seed: std 0, not NaN
  z = agg.zero_shot
  assert (z["E"], z["F"], z["O"], z["A_down"], z["A_up"]) == (0.0, 0.0, 0.0, 30.0, 140.0 / 3)
  assert z["H"] == pytest.approx(2 * 30.0 * (140 / 3) / (30.0 + 140 / 3))


def test_aggregate_memory_and_step_time():
  runs = [_run(m, s, peak_memory_gib=2.0 + s, step_time_s=0.5) for m in TUNED
          for s in TUNED[m]]
  agg = T.aggregate(runs)
  assert agg.methods["full"].mean["peak_memory_gib"] == 3.0
  assert agg.methods["full"].std["peak_memory_gib"] == pytest.approx(1.0)
  runs[1] = dataclasses.replace(runs[1], peak_memory_gib=None)
  with pytest.raises(ValueError, match=r"run 'full' seed 1 lacks peak_memory_gib"):
    T.aggregate(runs)


# ----------------------------------------------------------------------------- table
def _row(table, name):
  rows = [l for l in table.splitlines() if l.startswith(f"| {name} |")]
  assert len(rows) == 1, (name, table)
  return [c.strip() for c in rows[0].strip("|").split("|")]


def test_markdown_table_rows_and_numbers():
  runs = [_run(m, s, step_time_s=0.25) for m in TUNED for s in TUNED[m]]
  agg = T.aggregate(runs)
  table = T.markdown_table(agg)
  header = [c.strip() for c in table.splitlines()[0].strip("|").split("|")]
  assert header == ["method", "seeds", "trainable", "trainable %", "A_down", "A_d iconqa",
                    "A_d coco", "A_u okvqa", "A_u gqa", "A_u textvqa", "Ā_up", "E", "F", "O",
                    "H", "step (s)"]
  full = dict(zip(header, _row(table, "full")))
  # full: A_down per seed 70, 72, 69.5 -> 70.50 ± 1.32; E = A_down - 30; F per seed -20/3,
  # -22/3, -23/3 -> -7.22 ± 0.51; params 1,000 = 100%.
  assert full["seeds"] == "3" and full["trainable"] == "1,000" and full["trainable %"] == "100%"
  assert full["A_down"] == "70.50 ± 1.32" and full["E"] == "40.50 ± 1.32"
  assert full["F"] == "-7.22 ± 0.51" and full["A_u okvqa"] == "41.00 ± 1.00"
  assert full["step (s)"] == "0.25 ± 0.00"
  lora = dict(zip(header, _row(table, "lora")))
  assert lora["trainable"] == "12" and lora["trainable %"] == "1.2%"
  for m, summ in agg.methods.items():  # every cell of every method row
    cells = dict(zip(header, _row(table, m)))
    for key, col in [("A_down", "A_down"), ("A_up", "Ā_up"), ("E", "E"), ("F", "F"),
                     ("O", "O"), ("H", "H"), ("A_u/gqa", "A_u gqa")]:
      spread = f" ± {summ.std[key]:.2f}" if len(summ.seeds) > 1 else ""  # one seed: none
      assert cells[col] == f"{summ.mean[key]:.2f}{spread}", (m, col)
  zero = dict(zip(header, _row(table, "zero-shot")))
  assert zero["A_down"] == "30.00" and zero["E"] == "0.00" and zero["Ā_up"] == "46.67"
  assert zero["trainable"] == "0" and zero["step (s)"] == "—"
  tiny_negative = dataclasses.replace(agg, zero_shot=agg.zero_shot | {"E": -1e-17})
  assert "-0.00" not in T.markdown_table(tiny_negative)  # no negative zero
  one = T.aggregate([r for r in runs if r.method != "full" or r.seed == 0])
  cells = dict(zip(header, _row(T.markdown_table(one), "full")))  # one seed: no "± 0.00"
  assert cells["seeds"] == "1" and cells["A_down"] == "70.00" and "±" not in "".join(cells.values())
  assert "negative = forgetting" in table and "ddof=1" in table and "O = E + F" in table
  lines = table.splitlines()
  assert [l.split("|")[1].strip() for l in lines[2:6]] == ["zero-shot", "full", "lora", "frozen"]
  wide = T.markdown_table(agg, digits=3, forgetting=True)
  assert dict(zip([c.strip() for c in wide.splitlines()[0].strip("|").split("|")],
                  _row(wide, "full")))["forget okvqa"] == "9.000 ± 1.000"


# ----------------------------------------------------------------------------- plot
@pytest.mark.parametrize("x,y,size", [("A_down", "A_up", (641, 479)), ("E", "F", (400, 300))])
def test_scatter_plot_png(tmp_path, x, y, size):
  path = T.scatter_plot(T.aggregate(_runs()), tmp_path / "p.png", x=x, y=y, size_px=size)
  with Image.open(path) as im:
    assert im.format == "PNG" and im.size == size
    px = np.asarray(im.convert("RGB"), dtype=np.float64)
  assert px.var() > 0


def test_scatter_plot_rejects_unknown_axis(tmp_path):
  with pytest.raises(ValueError, match="x must be"):
    T.scatter_plot(T.aggregate(_runs()), tmp_path / "p.png", x="O")


# ----------------------------------------------------------------------------- report IO
def test_save_report_round_trip(tmp_path):
  runs = _runs(peak_memory_gib=1.5, curves=[(0, 30.0, 46.0), (10, 55.5, 45.25)])
  runs[0] = dataclasses.replace(runs[0], peak_memory_gib=1.75, step_time_s=None, curves=None)
  paths = T.save_report(runs, tmp_path / "out")
  assert sorted(p.name for p in (tmp_path / "out").iterdir()) == \
      ["runs.json", "tradeoff.md", "tradeoff.png"]
  back = T.load_runs(paths["runs"])
  assert back == runs and T.load_runs(tmp_path / "out") == runs
  assert back[1].curves == ((0, 30.0, 46.0), (10, 55.5, 45.25))
  md = open(paths["markdown"]).read()
  assert "| full | 3 |" in md and "forget okvqa" in md and "tradeoff.png" in md
  assert T.markdown_table(T.aggregate(back)) == T.markdown_table(T.aggregate(runs))
  with Image.open(paths["plot"]) as im:
    assert im.size == (800, 600)


def test_load_runs_rejects_bad_files(tmp_path):
  (tmp_path / "a.json").write_text(json.dumps([1, 2]))
  with pytest.raises(ValueError, match="not a runs.json"):
    T.load_runs(tmp_path / "a.json")
  d = _run("full", 0).to_dict()
  d["acc"] = 1
  (tmp_path / "b.json").write_text(json.dumps({"version": 1, "runs": [d]}))
  with pytest.raises(ValueError, match=r"unknown run field\(s\) \['acc'\] in 'full' seed 0"):
    T.load_runs(tmp_path / "b.json")


# ----------------------------------------------------------------------------- bad input
def test_run_missing_a_set_the_others_have():
  runs = _runs()
  acc = {s: v for s, v in TUNED["lora"][1].items() if s != "gqa"}
  base = {s: v for s, v in BASE.items() if s != "gqa"}
  runs[4] = _run("lora", 1, general=("okvqa", "textvqa"), base_acc=base, tuned_acc=acc)
  with pytest.raises(ValueError, match=r"run 'lora' seed 1 lacks general set 'gqa' that "
                     r"run 'full' seed 0 has"):
    T.aggregate(runs)
  runs = _runs()
  runs[0] = _run("full", 0, downstream=("iconqa",), base_acc=base | {"coco": 1.0},
                 tuned_acc=acc | {"coco": 1.0}, general=("okvqa", "textvqa", "coco"))
  with pytest.raises(ValueError, match=r"run 'full' seed 0 lacks downstream set 'coco' that "
                     r"run 'full' seed 1 has"):
    T.aggregate(runs)


def test_run_missing_accuracy_for_declared_set():
  acc = {s: v for s, v in TUNED["lora"][2].items() if s != "textvqa"}
  with pytest.raises(ValueError, match=r"run 'lora' seed 2 lacks tuned accuracy \(tuned_acc\) "
                     r"for general set 'textvqa'"):
    _run("lora", 2, tuned_acc=acc)
  with pytest.raises(ValueError, match=r"run 'lora' seed 2: tuned_acc has set\(s\) \['vizwiz'\]"):
    _run("lora", 2, tuned_acc=TUNED["lora"][2] | {"vizwiz": 3.0})


def test_no_general_sets():
  with pytest.raises(ValueError, match=r"run 'full' seed 0 has no general \(upstream\) sets"):
    _run("full", 0, general=(), base_acc={s: BASE[s] for s in DOWN},
         tuned_acc={s: TUNED["full"][0][s] for s in DOWN})


def test_mismatched_zero_shot_same_base():
  runs = _runs()
  runs[5] = _run("lora", 2, base_acc=BASE | {"gqa": 61.0})
  with pytest.raises(ValueError, match=r"zero-shot accuracy on set 'gqa' differs between run "
                     r"'full' seed 0 \(60.0\) and run 'lora' seed 2 \(61.0\) on the same base"):
    T.aggregate(runs)


def test_other_bad_input():
  with pytest.raises(ValueError, match="no runs"):
    T.aggregate([])
  with pytest.raises(ValueError, match="mix base models"):
    T.aggregate([_run("full", 0), _run("lora", 0, base="other")])
  with pytest.raises(ValueError, match=r"run 'full' seed 0 appears twice"):
    T.aggregate([_run("full", 0), _run("full", 0)])
  with pytest.raises(ValueError, match="reserved"):
    dataclasses.replace(_run("full", 0), method="zero-shot")
  with pytest.raises(ValueError, match=r"both downstream and general"):
    _run("full", 0, general=GEN + ("coco",))
  with pytest.raises(ValueError, match=r"tuned_acc\['gqa'\] must be finite"):
    _run("full", 0, tuned_acc=TUNED["full"][0] | {"gqa": float("nan")})
  with pytest.raises(ValueError, match="trainable_params"):
    _run("full", 0, trainable_params=2000)
