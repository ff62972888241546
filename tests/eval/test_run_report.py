"""Run report from synthetic run directories: the per-step table, checkpoint selection vs a hand
argmax of O = E + F over checkpointed steps, a resumed run's later line winning, the post-hoc
section, the PNG's exact pixel size, the multi-run overlay, and errors naming the file."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from mllm_tune.eval import run_report as R

TARGET, RETENTION = ("digits",), ("general", "ocr")
# step -> (digits, general, ocr). Step 300 is logged twice: a stale line before the resume and the
# later line that counts. Step 200 is best by O but has no checkpoint.
SCORES = {0: (20.0, 60.0, 40.0), 100: (40.0, 58.0, 39.0), 200: (60.0, 58.0, 40.0),
          300: (58.0, 57.0, 40.0), 400: (70.0, 30.0, 20.0)}
STALE_300 = (45.0, 40.0, 20.0)
CKPTS = (100, 300, 400)


def _hand(s, s0=SCORES[0], w=(1.0, 1.0)):
  """A_down, A_up, E, F, O, weighted by plain arithmetic against step 0."""
  a_down, a_up = s[0], (s[1] + s[2]) / 2.0
  e = s[0] - s0[0]
  f = ((s[1] - s0[1]) + (s[2] - s0[2])) / 2.0
  return {"A_down": a_down, "A_up": a_up, "E": e, "F": f, "O": e + f,
          "weighted": w[0] * e + w[1] * f}


def _eval_line(step, s, w=(1.0, 1.0)):
  rec = {"step": step, "eval/target/digits": s[0], "eval/retention/general": s[1],
         "eval/retention/ocr": s[2], "eval/retention/general/color": s[1] + 1.0,
         "eval/retention/general/kl": step / 1000.0, "eval/retention/general/agree": 0.9,
         "time/eval_s": 2.0, "time/eval_share": 0.125}
  h = _hand(s, w=w)
  rec.update({f"tradeoff/{k}": v for k, v in h.items()})
  rec["tradeoff/H"] = 2 * h["A_down"] * h["A_up"] / (h["A_down"] + h["A_up"])
  return rec


def _make_run(root, name="run_a", scores=SCORES, ckpts=CKPTS, weights=(1.0, 1.0),
              retention_json=True, posthoc=None):
  d = root / name
  d.mkdir(parents=True)
  lines = []
  for step in range(0, 401, 50):
    train = {"step": step, "loss": 1.0 / (step + 1), "ce": 0.5, "learning_rate": 1e-4}
    if step == 100:  # eval merged into the training record
      lines.append({**train, **_eval_line(step, scores[step], weights)})
      continue
    if step:
      lines.append(train)
    if step == 300:
      lines.append(_eval_line(300, STALE_300, weights))
    elif step in scores:
      lines.append(_eval_line(step, scores[step], weights))
  lines.append({"step": 300, "loss": 0.1, "ce": 0.1, "learning_rate": 1e-4})  # resumed
  lines.append(_eval_line(300, scores[300], weights))
  lines.append({"step": 400, "loss": 0.1, "ce": 0.1, "learning_rate": 1e-4})
  (d / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines) + "\n")
  if retention_json:
    (d / "retention.json").write_text(json.dumps(
        {"target": list(TARGET), "retention": list(RETENTION),
         "select": {"metric": "tradeoff/O", "mode": "max"}, "weights": list(weights),
         "reference_step": 0}))
  for s in ckpts:
    (d / "checkpoints" / str(s)).mkdir(parents=True)
  (d / "checkpoints").mkdir(exist_ok=True)
  (d / "checkpoints" / "500.orbax-checkpoint-tmp-1").mkdir()  # not a finished step
  if posthoc is not None:
    (d / "posthoc.json").write_text(json.dumps(posthoc))
  return d


def _metrics(s):
  h = _hand(s)
  return {"eval/target/digits": s[0], "eval/retention/general": s[1], "eval/retention/ocr": s[2],
          **{f"tradeoff/{k}": v for k, v in h.items()}}


POSTHOC_SCORES = {0.0: SCORES[0], 0.6: (56.0, 60.0, 42.0), 1.0: SCORES[300]}  # 0.6: best O
POSTHOC = {"name": "wise_ft", "param": "alpha", "chosen": 0.6,
           "select": {"metric": "tradeoff/O", "mode": "max"},
           "candidates": [{"value": a, "metrics": _metrics(s)} for a, s in POSTHOC_SCORES.items()],
           "before": _metrics(SCORES[300]), "after": _metrics(POSTHOC_SCORES[0.6]),
           "from_step": 300}


def _rows(md, first_header="step"):
  """{first cell (bold stripped): {column: cell}} of the markdown table starting with
  `| first_header |`."""
  lines = md.splitlines()
  i = next(k for k, l in enumerate(lines) if l.startswith(f"| {first_header} |"))
  cols = [c.strip() for c in lines[i].strip("|").split("|")]
  out = {}
  for l in lines[i + 2:]:
    if not l.startswith("|"):
      break
    cells = [c.strip() for c in l.strip("|").split("|")]
    out[cells[0].strip("*")] = dict(zip(cols, cells))
  return out


def _hand_selected(scores=SCORES, steps=CKPTS):
  return max(steps, key=lambda s: (_hand(scores[s])["O"], -s))


# ----------------------------------------------------------------------------- load
def test_load_run(tmp_path):
  run = R.load_run(_make_run(tmp_path))
  assert run.name == "run_a" and run.target == TARGET and run.retention == RETENTION
  assert (run.metric, run.mode, run.weights, run.inferred) == ("tradeoff/O", "max", (1.0, 1.0),
                                                               False)
  assert [r["step"] for r in run.records] == sorted(SCORES)
  assert run.checkpoint_steps == list(CKPTS) and run.posthoc is None
  r300 = run.records[3]
  assert r300["eval/target/digits"] == SCORES[300][0]  # the later (resumed) line wins
  assert r300["tradeoff/O"] == pytest.approx(_hand(SCORES[300])["O"])
  assert "loss" in run.records[1]  # step 100: eval merged into the training line


def test_missing_retention_json_infers_sets_and_tradeoff(tmp_path):
  d = _make_run(tmp_path, retention_json=False)
  lines = [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines() if l]
  for l in lines:  # drop the logged trade-off keys: the report must recompute them
    for k in [k for k in l if k.startswith("tradeoff/")]:
      del l[k]
  (d / "metrics.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines))
  run = R.load_run(d)
  assert run.inferred and run.target == TARGET and run.retention == RETENTION  # no "color"
  assert (run.metric, run.mode) == ("tradeoff/O", "max")
  for r in run.records:
    assert r["tradeoff/O"] == pytest.approx(_hand(SCORES[r["step"]])["O"])
  assert R.selected(run).step == _hand_selected() == 300
  assert "No retention.json" in R.markdown(run)


# ----------------------------------------------------------------------------- markdown
def test_markdown_table_rows_and_values(tmp_path):
  md = R.markdown(R.load_run(_make_run(tmp_path)))
  assert md.startswith("# Run report: run_a")
  rows = _rows(md)
  assert list(rows) == [str(s) for s in sorted(SCORES)]
  for step, s in SCORES.items():
    row, h = rows[str(step)], _hand(s)
    assert row["target digits"] == f"{s[0]:.2f}"
    assert row["retention general"] == f"{s[1]:.2f}" and row["retention ocr"] == f"{s[2]:.2f}"
    assert row["KL general"] == f"{step / 1000.0:.2f}"
    assert (row["E"], row["F"], row["O"]) == tuple(f"{h[k]:.2f}" for k in "EFO")
    assert row["eval time %"] == "12.50"
  assert "weighted" not in rows["0"] and "retention general/color" not in rows["0"]
  assert "| **300** |" in md  # the selected step is bold


def test_selected_checkpoint_is_hand_argmax_over_checkpoints(tmp_path):
  run = R.load_run(_make_run(tmp_path))
  best = _hand_selected()
  assert best == 300 and max(SCORES, key=lambda s: _hand(SCORES[s])["O"]) == 200  # 200: no ckpt
  sel = R.selected(run)
  assert (sel.step, sel.among_checkpoints) == (best, True)
  assert sel.value == pytest.approx(_hand(SCORES[300])["O"])
  text = R.markdown(run).split("## Selected checkpoint", 1)[1]
  h, last = _hand(SCORES[300]), _hand(SCORES[400])
  assert f"**Step {best}** wins" in text and "3 checkpointed eval steps" in text
  assert f"tradeoff/O = {h['O']:.2f} (E = {h['E']:.2f}, F = {h['F']:.2f})" in text
  assert f"last eval step 400 has tradeoff/O = {last['O']:.2f}" in text
  assert "best target score, 400" in text


def test_selection_without_checkpoints_uses_all_eval_steps(tmp_path):
  run = R.load_run(_make_run(tmp_path, ckpts=()))
  sel = R.selected(run)
  assert (sel.step, sel.among_checkpoints) == (_hand_selected(steps=tuple(SCORES)), False) \
      == (200, False)
  assert "the run has no checkpoints" in R.markdown(run)


def test_weighted_column_when_weights_differ(tmp_path):
  md = R.markdown(R.load_run(_make_run(tmp_path, weights=(1.0, 2.0))))
  rows = _rows(md)
  assert rows["400"]["weighted"] == f"{_hand(SCORES[400], w=(1.0, 2.0))['weighted']:.2f}"


def test_posthoc_section(tmp_path):
  md = R.markdown(R.load_run(_make_run(tmp_path, posthoc=POSTHOC)))
  text = md.split("## Post-hoc step: wise_ft", 1)[1]
  cand = _rows(text, "alpha")
  assert list(cand) == ["0.00", "0.60", "1.00"] and "| **0.60** |" in text
  for a, s in POSTHOC_SCORES.items():
    row, h = cand[f"{a:.2f}"], _hand(s)
    assert row["target digits"] == f"{s[0]:.2f}" and row["retention ocr"] == f"{s[2]:.2f}"
    assert (row["E"], row["F"], row["O"]) == tuple(f"{h[k]:.2f}" for k in "EFO")
  assert "Chosen alpha = 0.60 (by tradeoff/O, max), applied to the checkpoint of step 300" in text
  ba = _rows(text, "")
  for w, s in (("before", SCORES[300]), ("after", POSTHOC_SCORES[0.6])):
    h = _hand(s)
    assert [ba[w][k] for k in ("A_down", "A_up", "E", "F", "O")] == \
        [f"{h[k]:.2f}" for k in ("A_down", "A_up", "E", "F", "O")]


# ----------------------------------------------------------------------------- files
def _png(path, size):
  with Image.open(path) as im:
    assert im.format == "PNG" and im.size == size
    assert np.asarray(im.convert("RGB"), dtype=np.float64).var() > 0


def test_write_report_and_plot_size(tmp_path):
  d = _make_run(tmp_path, posthoc=POSTHOC)
  paths = R.write_report(d)
  assert paths == {"markdown": str(d / "report.md"), "plot": str(d / "report.png")}
  assert "report.png" in open(paths["markdown"]).read()
  _png(paths["plot"], (1200, 500))
  run = R.load_run(d)
  _png(R.plot([run], tmp_path / "small.png", size_px=(641, 333)), (641, 333))


def test_overlay_and_report_command(tmp_path):
  other = {**SCORES, 400: (75.0, 59.0, 40.0)}  # the second run keeps learning without forgetting
  a = _make_run(tmp_path, "run_a", posthoc=POSTHOC)
  b = _make_run(tmp_path, "run_b", scores=other)
  out = tmp_path / "cmp"
  paths = R.report_command([str(a), str(b)], str(out))
  assert paths == {"markdown": str(out / "overlay.md"), "plot": str(out / "overlay.png")}
  rows = _rows(open(paths["markdown"]).read(), "run")
  assert list(rows) == ["run_a", "run_b"]
  assert rows["run_a"]["selected step"] == str(_hand_selected()) == "300"
  assert rows["run_b"]["selected step"] == str(_hand_selected(other)) == "400"
  assert rows["run_a"]["O"] == f"{_hand(SCORES[300])['O']:.2f}"
  assert rows["run_a"]["last O"] == f"{_hand(SCORES[400])['O']:.2f}"
  assert rows["run_a"]["post-hoc O"] == f"{_hand(POSTHOC_SCORES[0.6])['O']:.2f}"
  assert rows["run_b"]["post-hoc O"] == "–"
  _png(paths["plot"], (1200, 500))
  single = R.report_command([str(a)], None)
  assert single["markdown"] == str(a / "report.md") and os.path.isfile(single["plot"])


# ----------------------------------------------------------------------------- errors
def test_errors_name_the_file(tmp_path):
  with pytest.raises(R.ReportError, match="does not exist"):
    R.load_run(tmp_path / "nope")
  (tmp_path / "empty").mkdir()
  with pytest.raises(R.ReportError, match="metrics.jsonl not found"):
    R.load_run(tmp_path / "empty")
  d = _make_run(tmp_path)
  lines = (d / "metrics.jsonl").read_text().splitlines()
  lines[2] = '{"step": 50, "loss": '
  (d / "metrics.jsonl").write_text("\n".join(lines) + "\n")
  with pytest.raises(R.ReportError, match=r"metrics\.jsonl:3: malformed JSON line"):
    R.load_run(d)
  (d / "metrics.jsonl").write_text('{"step": 10, "loss": 1.0}\n{"step": 20, "loss": 0.9}\n')
  with pytest.raises(R.ReportError, match="has no evaluation records: set train.eval_every"):
    R.load_run(d)
  with pytest.raises(R.ReportError, match="several runs need --out"):
    R.report_command([str(d), str(d)], None)
  assert issubclass(R.ReportError, ValueError)
