"""Retention-aware training (issue 11): target and retention evaluated in the run, KL from θ0,
checkpoint selection by the trade-off, the run report, recipes with a post-hoc step, bad input.

The base is the offline benchmark's tiny pre-trained LLaVA (`mllm_tune/benchmark/config.py:tiny`,
built once per test session in a temporary cache); results/retention/ holds the real run."""
from __future__ import annotations

import importlib
import json
import os

import jax
import numpy as np
import pytest

from configs import base as base_cfg
from configs.experiments import offline_recipe
import mllm_tune as mt
from mllm_tune import pytree
from mllm_tune.benchmark.pretrain import resolve_model_source
from mllm_tune.cli import build_data
from mllm_tune.eval import retention as ret
from mllm_tune.eval import selection
from mllm_tune.train import setup
from mllm_tune.train.loop import Trainer

BENCH = "mllm_tune/benchmark/config.py:tiny"


@pytest.fixture(scope="module")
def cache():
  """The session's bench cache (tests/conftest.py); the tiny base is built there once."""
  return os.environ["MLLM_TUNE_CACHE"]


def small(c, run_dir, steps=6, eval_every=2):
  c.model.bench_config = BENCH
  c.run_dir = str(run_dir)
  c.data.batch_size = 4
  c.train.update(dict(steps=steps, eval_every=eval_every, log_every=1, async_save=False,
                      keep=20))
  c.eval.update(dict(batch_size=4, max_new_tokens=3))
  c.eval.target.digits.num = 6
  c.eval.retention.general.num = 8
  return c


def trainer_for(c) -> Trainer:
  resolve_model_source(c.model)
  return Trainer(c, data=lambda m: build_data(c, m), progress=False)


def read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def full_run(cache, tmp_path_factory):
  """Full fine-tuning, 6 steps, evals at 0, 2, 4, 6 with token-accuracy sets (they move in a
  few steps, so the selection has something to choose) plus the VQA sets."""
  c = small(offline_recipe.get_config("full"), tmp_path_factory.mktemp("full") / "run")
  c.optimizer.learning_rate = 1e-2
  c.eval.target.digits_tok = base_cfg.eval_set("offline", "digits", num=6, metric="token")
  c.eval.retention.color_tok = base_cfg.eval_set("offline", "color", num=6, metric="token")
  tr = trainer_for(c)
  summary = tr.run()
  return tr, summary, read_jsonl(os.path.join(c.run_dir, "metrics.jsonl"))


def test_step0_is_the_base_reference_with_zero_kl(full_run):
  tr, summary, records = full_run
  assert summary["status"] == "done"
  evals = selection.eval_records(records)
  assert [r["step"] for r in evals] == [0, 2, 4, 6]
  r0 = evals[0]
  for s in ("retention/general", "retention/color_tok"):
    assert r0[f"eval/{s}/kl"] == 0.0 and r0[f"eval/{s}/agree"] == 1.0
  assert "eval/target/digits/kl" not in r0  # KL is a retention measure
  assert r0["tradeoff/E"] == r0["tradeoff/F"] == r0["tradeoff/O"] == 0.0
  ref = json.load(open(os.path.join(tr.run_dir, "retention.json")))
  assert ref["reference"]["eval/retention/general"] == r0["eval/retention/general"]
  # full fine-tuning at lr 1e-2 moves the model away from θ0
  assert evals[-1]["eval/retention/general/kl"] > 0.0
  assert 0.0 < evals[-1]["time/eval_share"] < 1.0


def test_forgetting_scores_are_differences_to_step0(full_run):
  _, _, records = full_run
  evals = selection.eval_records(records)
  r0 = evals[0]
  for r in evals[1:]:
    e = np.mean([r[f"eval/target/{s}"] - r0[f"eval/target/{s}"] for s in ("digits", "digits_tok")])
    f = np.mean([r[f"eval/retention/{s}"] - r0[f"eval/retention/{s}"]
                 for s in ("general", "color_tok")])
    assert r["tradeoff/E"] == pytest.approx(e, abs=1e-9)
    assert r["tradeoff/F"] == pytest.approx(f, abs=1e-9)
    assert r["tradeoff/O"] == pytest.approx(e + f, abs=1e-9)


def test_selection_picks_the_hand_computed_step(full_run):
  tr, summary, records = full_run
  evals = selection.eval_records(records)
  r0 = evals[0]
  saved = set(tr.ckpt.all_steps())
  by_hand = {}
  for r in evals[1:]:
    t = np.mean([r[f"eval/target/{s}"] for s in ("digits", "digits_tok")])
    t0 = np.mean([r0[f"eval/target/{s}"] for s in ("digits", "digits_tok")])
    f = np.mean([r[f"eval/retention/{s}"] - r0[f"eval/retention/{s}"]
                 for s in ("general", "color_tok")])
    if r["step"] in saved:
      by_hand[r["step"]] = (t - t0) + f
  assert len(set(np.round(list(by_hand.values()), 9))) > 1, "nothing to choose between"
  best = max(by_hand.values())
  want = min(s for s, v in by_hand.items() if v == best)
  assert summary["best_step"] == want
  report = open(os.path.join(tr.run_dir, "report.md")).read()
  assert f"**Step {want}** wins" in report
  assert os.path.getsize(os.path.join(tr.run_dir, "report.png")) > 1000


def test_in_run_scores_equal_the_benchmark_evaluation_of_the_checkpoints(full_run):
  """Same metric, same data: the bench's after-the-fact `measure` of each kept checkpoint gives
  the numbers the run logged at that step."""
  from mllm_tune.benchmark import runner
  from mllm_tune.train.config_io import load_config
  tr, _, records = full_run
  bcfg = load_config(BENCH)
  bcfg.eval.update(dict(general_per_family=2, downstream=6, batch_size=4, max_new_tokens=3))
  base = runner.load_base(tr.cfg.model.path)
  sets = runner.prepare_sets(bcfg, base)
  by_step = {r["step"]: r for r in selection.eval_records(records)}
  checked = 0
  for step in tr.ckpt.all_steps():
    v = tr.variables_at(step)
    acc = runner.measure(bcfg, base, sets, v["params"], v.get("adapters"))
    r = by_step[step]
    assert acc["digits"] == pytest.approx(r["eval/target/digits"], abs=1e-9)
    for fam in bcfg.general:
      assert acc[fam] == pytest.approx(r[f"eval/retention/general/{fam}"], abs=1e-9)
    assert np.mean([acc[f] for f in bcfg.general]) == pytest.approx(
        r["eval/retention/general"], abs=1e-9)
    checked += 1
  assert checked >= 3


def test_without_a_selection_metric_the_printed_best_step_is_the_reports(cache, tmp_path):
  """train.best_metric unset: the tracker selects by the default O, and so must the summary's
  best_step (it used to be the latest checkpoint). A learning rate of 1e-9 leaves every score
  at step 0's, so O ties at 0 and the earliest checkpointed eval step (2) wins, not the last."""
  from mllm_tune.eval import run_report
  c = small(offline_recipe.get_config("lora"), tmp_path / "run", steps=4, eval_every=2)
  c.train.update(dict(best_metric="", save_every=2))
  c.optimizer.update(dict(learning_rate=1e-9, warmup_steps=0))
  summary = trainer_for(c).run()
  evals = selection.eval_records(read_jsonl(os.path.join(c.run_dir, "metrics.jsonl")))
  assert [r["tradeoff/O"] for r in evals] == [0.0, 0.0, 0.0]
  sel = run_report.selected(run_report.load_run(c.run_dir))
  assert sel.step == 2 and summary["best_step"] == 2
  assert "**Step 2** wins" in open(os.path.join(c.run_dir, "report.md")).read()


def test_tensorboard_has_the_eval_scalars(full_run):
  from mllm_tune.train.logs import read_records
  tr, _, _ = full_run
  tb = os.path.join(tr.run_dir, "tb")
  events = [os.path.join(tb, f) for f in os.listdir(tb)]
  blob = b"".join(b"".join(read_records(p)) for p in events)
  assert b"eval/retention/general/kl" in blob and b"tradeoff/O" in blob


def test_kl_to_base_equals_float64_numpy(cache):
  """The evaluator's KL / agreement / loss on a small set equal NumPy float64 formulas on the
  logits of the two models (the base and a perturbed copy)."""
  from mllm_tune.benchmark import runner
  from mllm_tune.benchmark import pretrain
  from mllm_tune.train.config_io import load_config
  from mllm_tune.train.step import model_kwargs
  path = pretrain.ensure_base(load_config(BENCH))
  b = runner.load_base(path)
  spec = base_cfg.eval_set("offline", "general", num=5)
  sets = ret.build_sets({"retention": {"general": spec}}, b.preparer,
                        b.model.config.vision.image_size)
  keys = iter(jax.random.split(jax.random.key(0), 1000))
  tuned = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(next(keys), x.shape, x.dtype),
                       b.params)
  batch = sets[0].arrays.batch(np.arange(5), b.spec)
  apply = jax.jit(lambda p: b.model.apply({"params": p}, batch["input_ids"],
                                          **model_kwargs(batch)))
  log_softmax = lambda z: z - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(
      -1, keepdims=True)) - z.max(-1, keepdims=True)
  lp = log_softmax(np.asarray(apply(tuned), np.float64)[:, :-1])
  lq = log_softmax(np.asarray(apply(b.params), np.float64)[:, :-1])
  kl = (np.exp(lq) * (lq - lp)).sum(-1)
  am = batch["attention_mask"]
  for tokens in ("supervised", "all"):
    ev = ret.Evaluator(b.model, sets, b.tokenizer, b.spec, batch_size=4, kl_tokens=tokens)
    got = ev.divergence({"params": tuned}, {"params": b.params}, sets[0])
    lm = batch["loss_mask"][:, 1:].astype(np.float64)
    w = lm if tokens == "supervised" else (am[:, 1:] * am[:, :-1]).astype(np.float64)
    assert got["kl"] == pytest.approx((kl * w).sum() / w.sum(), rel=1e-5)
    assert got["kl"] > 1e-4
    agree = (lp.argmax(-1) == lq.argmax(-1)) * w
    assert got["agree"] == pytest.approx(agree.sum() / w.sum(), abs=1e-9)
    nll = -np.take_along_axis(lp, batch["input_ids"][:, 1:, None], -1)[..., 0]
    assert got["loss"] == pytest.approx((nll * lm).sum() / lm.sum(), rel=1e-5)


def test_recipe_runs_end_to_end_with_its_posthoc_step(cache, tmp_path, capsys):
  """LoRASculpt + EWC + WiSE-FT: trained, the alpha chosen on the eval sets, the merged model
  saved; its scores re-measured from the saved model equal the record's `after`."""
  from mllm_tune.checkpoints.native import load_native
  rec = importlib.import_module("configs.experiments.recipe_lorasculpt")
  c = small(rec.get_config(), tmp_path / "run", steps=2, eval_every=2)
  c.penalty.fisher_samples = 4
  c.posthoc.sweep = (0.0, 0.5, 1.0)
  tr = trainer_for(c)
  summary = tr.run()
  ph = summary["posthoc"]
  assert ph["name"] == "wise_ft" and ph["param"] == "alpha"
  assert [x["value"] for x in ph["candidates"]] == [0.0, 0.5, 1.0]
  o = [x["metrics"]["tradeoff/O"] for x in ph["candidates"]]
  assert ph["chosen"] == ph["candidates"][int(np.argmax(o))]["value"]
  # alpha = 1 is the tuned model: its scores are the `before` ones (the last eval's)
  assert ph["candidates"][2]["metrics"]["eval/retention/general/kl"] == pytest.approx(
      ph["before"]["eval/retention/general/kl"], rel=1e-5)
  # alpha = 0 is θ0: no divergence
  assert ph["candidates"][0]["metrics"]["eval/retention/general/kl"] == 0.0
  _, params = load_native(ph["model_dir"])
  again = tr.tracker.score_params(params)
  for k in ("eval/target/digits", "eval/retention/general", "eval/retention/general/kl"):
    assert again[k] == pytest.approx(ph["after"][k], rel=1e-6, abs=1e-9)
  report = open(os.path.join(c.run_dir, "report.md")).read()
  assert "Post-hoc step: wise_ft" in report and "| before |" in report and "| after |" in report
  # `export --posthoc --merged`: that model as an HF directory with the base's tokenizer and
  # processor files; the other outputs are refused (it is merged already)
  from mllm_tune.checkpoints.hf import AUX_FILES
  from mllm_tune.cli import main
  out = str(tmp_path / "posthoc_hf")
  assert main(["export", c.run_dir, "--posthoc", "--merged", out]) == 0
  _, hf_params = mt.load_pretrained(out)
  for (p, a), (q, b) in zip(sorted(pytree.flatten(hf_params).items()),
                            sorted(pytree.flatten(params).items())):
    assert p == q and np.array_equal(np.asarray(a), np.asarray(b)), p
  aux = {f for f in os.listdir(c.model.path) if AUX_FILES.fullmatch(f)}
  assert aux and aux <= set(os.listdir(out)), (aux, os.listdir(out))
  assert main(["export", c.run_dir, "--posthoc", "--peft", str(tmp_path / "p")]) == 2
  # a record of another step than the newest checkpoint (resumed since): stale, refused
  record_path = os.path.join(c.run_dir, "posthoc.json")
  record = json.load(open(record_path))
  assert record["from_step"] == 2
  json.dump({**record, "from_step": 1}, open(record_path, "w"))
  assert main(["export", c.run_dir, "--posthoc", "--merged", str(tmp_path / "m2")]) == 2
  assert "post-hoc model is of step 1, but the run's newest checkpoint is step 2" in \
      capsys.readouterr().err
  os.remove(record_path)
  assert main(["export", c.run_dir, "--posthoc", "--merged", str(tmp_path / "m3")]) == 2
  assert "no post-hoc model" in capsys.readouterr().err
  assert not os.path.exists(tmp_path / "m2") and not os.path.exists(tmp_path / "m3")


def test_report_command_regenerates_and_overlays(full_run, tmp_path):
  from mllm_tune.cli import main
  tr, _, _ = full_run
  os.remove(os.path.join(tr.run_dir, "report.md"))
  assert main(["report", tr.run_dir]) == 0
  assert os.path.isfile(os.path.join(tr.run_dir, "report.md"))
  out = tmp_path / "overlay"
  assert main(["report", tr.run_dir, tr.run_dir, "--out", str(out)]) == 0
  assert (out / "overlay.md").is_file() and (out / "overlay.png").is_file()


# ------------------------------------------------------------------------------- bad input
def _construct(c):
  with pytest.raises(setup.ConfigValueError) as e:
    trainer_for(c)
  return str(e.value)


def test_missing_retention_set_file(cache, tmp_path):
  c = small(offline_recipe.get_config("lora"), tmp_path / "r")
  c.eval.retention.extra = base_cfg.eval_set("llava_json", json_path=str(tmp_path / "nope.json"))
  msg = _construct(c)
  assert "eval.retention.extra.json_path" in msg and "nope.json" in msg


def test_empty_retention_set(cache, tmp_path):
  (tmp_path / "empty.json").write_text("[]")
  c = small(offline_recipe.get_config("lora"), tmp_path / "r")
  c.eval.retention.extra = base_cfg.eval_set("llava_json", json_path=str(tmp_path / "empty.json"))
  assert "eval.retention.extra" in _construct(c) and "empty" in _construct(c)


def test_unknown_offline_source_and_no_retention_set(cache, tmp_path):
  c = small(offline_recipe.get_config("lora"), tmp_path / "r")
  c.eval.retention.general.source = "weather"
  assert "eval.retention.general.source" in _construct(c)
  c = small(offline_recipe.get_config("lora"), tmp_path / "r2")
  del c.eval.retention["general"]
  assert "eval.retention" in _construct(c)


def test_unknown_selection_metric(cache, tmp_path):
  c = small(offline_recipe.get_config("lora"), tmp_path / "r")
  c.train.best_metric = "tradeoff/happiness"
  msg = _construct(c)
  assert "unknown selection metric 'tradeoff/happiness'" in msg and "tradeoff/O" in msg
  # held-out names only when the run has a held-out set (eval.kind): none here
  c.train.best_metric = "eval/loss"
  msg = _construct(c)
  assert "unknown selection metric 'eval/loss'" in msg and "eval/retention/general" in msg


def test_posthoc_step_that_does_not_apply(cache, tmp_path):
  c = small(offline_recipe.get_config("prompt_tuning", posthoc=dict(name="wise_ft")),
            tmp_path / "r")
  msg = _construct(c)
  assert "posthoc" in msg and "prompt_tuning" in msg and "merge" in msg
  assert not os.path.exists(os.path.join(c.run_dir, "metrics.jsonl"))  # refused before training


@pytest.mark.parametrize("name", ["full", "lora", "spider", "lorasculpt", "gift"])
def test_shipped_recipes_load_and_validate(name):
  from mllm_tune.train.config_io import load_config, validate
  c = load_config(f"configs/experiments/recipe_{name}.py")
  validate(c)
  assert c.model.source == "bench" and c.train.best_metric == "tradeoff/O"
  assert list(c.eval.target) == ["digits"] and list(c.eval.retention) == ["general"]
  assert (c.posthoc.name != "none") == (name in ("lorasculpt", "gift"))


def test_llava_json_retention_set_scores_like_the_same_offline_records(cache, tmp_path):
  """A LLaVA-format retention set (JSON + image files) is prepared and scored like the offline
  records it was written from: same task score, same KL."""
  from mllm_tune.benchmark import pretrain, runner
  from mllm_tune.data import offline_vqa as ov
  from mllm_tune.train.config_io import load_config
  b = runner.load_base(pretrain.ensure_base(load_config(BENCH)))
  size = b.model.config.vision.image_size
  src = ov.make_source("general", "eval", size, 8, 0)
  rows = []
  for i in range(len(src)):
    rec = src[i]
    (tmp_path / f"{i}.png").write_bytes(rec["images"][0])
    rows.append({"id": rec["id"], "image": f"{i}.png",
                 "conversations": rec["conversations"]})
  (tmp_path / "mix.json").write_text(json.dumps(rows))
  cfg = {"retention": {
      "offline": base_cfg.eval_set("offline", "general", num=8),
      "mix": base_cfg.eval_set("llava_json", json_path=str(tmp_path / "mix.json"),
                               image_folder=str(tmp_path))}}
  sets = ret.build_sets(cfg, b.preparer, size)
  np.testing.assert_array_equal(sets[0].arrays.input_ids, sets[1].arrays.input_ids)
  assert list(sets[1].arrays.answers) == list(sets[0].arrays.answers)
  ev = ret.Evaluator(b.model, sets, b.tokenizer, b.spec, batch_size=4, max_new_tokens=3)
  keys = iter(jax.random.split(jax.random.key(1), 1000))
  tuned = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(next(keys), x.shape, x.dtype),
                       b.params)
  m = ev({"params": tuned}, {"params": b.params})
  assert m["eval/retention/mix/kl"] == pytest.approx(m["eval/retention/offline/kl"], rel=1e-6)
  assert m["eval/retention/mix/kl"] > 0
  # the offline set averages its families; the JSON set is one family (its name)
  fams = [m[f"eval/retention/offline/{f}"] for f in ("color", "shape", "count", "position")]
  assert "eval/retention/mix/color" not in m
  preds = ev.task_scores({"params": tuned}, sets[1])
  assert m["eval/retention/mix"] == pytest.approx(preds["all"])
  assert m["eval/retention/offline"] == pytest.approx(np.mean(fams))


def test_trainer_refuses_an_unresolved_bench_source(tmp_path):
  """The training library does not import the benchmark: `model.source="bench"` is resolved
  by the caller (the CLI) first, and a Trainer handed the raw source says how."""
  c = small(offline_recipe.get_config(), tmp_path)
  assert c.model.source == "bench"
  with pytest.raises(setup.ConfigValueError, match="resolve_model_source"):
    Trainer(c, data=None, progress=False)
