"""`train/runs.py`: a run directory read back (`mt.load_run`) without its data or optimizer
state, the step it picks (latest, N, "best" by the run's own selection) and its refusals."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

import mllm_tune as mt
from mllm_tune import pytree
from mllm_tune.checkpoints.safetensors_io import CheckpointError
from mllm_tune.cli import build_data
from mllm_tune.train.loop import Trainer
from mllm_tune.train.runs import RunError
from tests.helpers.train import tiny_cfg


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A 4-step LoRA run on the tiny model, checkpoints at 2 and 4, and its Trainer."""
  cfg = tiny_cfg(str(tmp_path_factory.mktemp("runs") / "lora"), "lora", steps=4, save_every=2)
  trainer = Trainer(cfg, data=lambda m: build_data(cfg, m), progress=False)
  trainer.run()
  return cfg.run_dir, trainer


def _same(a: dict, b: dict):
  fa, fb = pytree.flatten(a), pytree.flatten(b)
  assert sorted(fa) == sorted(fb)
  for k in fa:
    np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k)


def test_load_run_reads_the_trained_variables_of_a_step(run):
  run_dir, trainer = run
  latest = mt.load_run(run_dir)
  assert latest.step == 4 and latest.method.name == "lora"
  _same(latest.variables, trainer.variables)  # the trainer's final state
  at2 = mt.load_run(run_dir, step=2)
  _same(at2.variables, trainer.variables_at(2))  # the trainer's own full-state restore
  assert latest.trained == {p for p in pytree.flatten(latest.variables)
                            if p.startswith("adapters/") and p.rsplit("/", 1)[1] in
                            ("lora_a", "lora_b")}
  a2 = np.asarray(at2.variables["adapters"]["llm"]["layers"]["attn"]["q_proj"]["lora_b"])
  a4 = np.asarray(latest.variables["adapters"]["llm"]["layers"]["attn"]["q_proj"]["lora_b"])
  assert np.abs(a4 - a2).max() > 1e-5


def test_best_follows_the_run_report_selection(run):
  run_dir, _ = run
  with pytest.raises(RunError, match="has no selection"):
    mt.load_run(run_dir, step="best")
  with pytest.raises(RunError, match=r"no checkpoint at step 3 \(checkpoints: \[2, 4\]\)"):
    mt.load_run(run_dir, step=3)
  # eval records as a tracked run logs them: step 2 is best by the trade-off score O
  evals = [(0, 10.0, 50.0), (2, 40.0, 50.0), (4, 30.0, 45.0)]  # (step, target, retention)
  with open(os.path.join(run_dir, "metrics.jsonl"), "a") as f:
    for step, t, r in evals:
      f.write(json.dumps({"step": step, "eval/target/t": t, "eval/retention/r": r}) + "\n")
  with open(os.path.join(run_dir, "retention.json"), "w") as f:
    json.dump({"target": ["t"], "retention": ["r"], "weights": [1.0, 1.0],
               "select": {"metric": "tradeoff/O", "mode": "max"}, "reference_step": 0,
               "reference": {"eval/target/t": 10.0, "eval/retention/r": 50.0}}, f)
  try:
    assert mt.load_run(run_dir, step="best").step == 2
  finally:
    os.remove(os.path.join(run_dir, "retention.json"))


def test_a_different_base_is_refused(run, tmp_path):
  run_dir, _ = run
  other = str(tmp_path / "other")
  os.makedirs(os.path.join(other, "checkpoints"))
  os.symlink(os.path.join(run_dir, "checkpoints", "4"), os.path.join(other, "checkpoints", "4"))
  with open(os.path.join(run_dir, "config.json")) as f:
    cfg = json.load(f)
  cfg["model"]["tiny"]["seed"] = 1  # another random base of the same shapes
  with open(os.path.join(other, "config.json"), "w") as f:
    json.dump(cfg, f)
  with pytest.raises(CheckpointError, match="refusing to mix them"):
    mt.load_run(other)
