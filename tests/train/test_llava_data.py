"""End to end: LLaVA-format JSON + images + a local tokenizer -> `mllm-tune train` with LoRA."""
from __future__ import annotations

import os

import numpy as np

from mllm_tune.cli import main
from tests.helpers.data import llava_model_dir, mixed_records, write_llava_dataset
from tests.helpers.train import losses


def test_train_lora_on_llava_json_with_packing(tmp_path, capsys):
  model_dir = llava_model_dir(str(tmp_path))
  records, images = mixed_records(30)
  data = write_llava_dataset(str(tmp_path / "data"), records, images)
  run = str(tmp_path / "run")
  code = main(["train", "--config=configs/experiments/llava_lora.py", "--no-progress",
               f"--config.model.path={model_dir}", f"--config.data.json_path={data}",
               f"--config.data.image_folder={tmp_path}/data/images",
               "--config.data.template=chatml", "--config.data.seq_len=96",
               "--config.data.batch_size=4", "--config.data.num_workers=0",
               "--config.train.steps=8", "--config.train.log_every=1",
               "--config.train.save_every=4", f"--config.run_dir={run}",
               "--config.optimizer.learning_rate=1e-2", "--config.train.eval_every=4",
               "--config.eval.kind=llava_json", f"--config.eval.json_path={data}",
               "--config.eval.num_batches=2"])
  out = capsys.readouterr()
  assert code == 0, out.err[-3000:]
  import json
  summary = json.loads(out.out.splitlines()[0])
  # what the data pipeline skipped or cut, by reason: seq_len 96 truncates 23 of the 30
  # records each epoch (logged per epoch too)
  assert set(summary["skipped"]) == {"truncated"} and summary["skipped"]["truncated"] >= 23
  curve = losses(run)
  assert len(curve) == 8 and all(np.isfinite(v) for v in curve.values())
  assert min(curve[7], curve[8]) < curve[1]
  assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == ["4", "8"]
  import json
  with open(os.path.join(run, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  evals = [r for r in rows if "eval/loss" in r]
  assert [r["step"] for r in evals] == [4, 8] and all(r["eval/tokens"] > 0 for r in evals)


def test_model_directory_files_are_checked_before_the_weights_load(tmp_path, capsys,
                                                                    monkeypatch):
  """No image processor config (nor a broken chat template): `mllm-tune train` stops naming the
  file before reading a single weight."""
  from mllm_tune.train import setup
  model_dir = llava_model_dir(str(tmp_path))
  records, images = mixed_records(3)
  data = write_llava_dataset(str(tmp_path / "data"), records, images)
  loads = []
  monkeypatch.setattr(setup, "load_model", lambda *a, **k: loads.append(a) or 1 / 0)
  args = ["train", "--config=configs/experiments/llava_lora.py", "--no-progress",
          f"--config.model.path={model_dir}", f"--config.data.json_path={data}",
          f"--config.run_dir={tmp_path}/run", "--config.data.template=chatml"]
  os.remove(os.path.join(model_dir, "preprocessor_config.json"))
  assert main(args) == 2
  err = capsys.readouterr().err
  assert "no image processor config: neither preprocessor_config.json" in err and model_dir in err
  from transformers import CLIPImageProcessor
  CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}
                     ).save_pretrained(model_dir)
  assert main(args + ["--config.data.template={{ 'no messages here' }}"]) == 2
  err = capsys.readouterr().err
  assert "chat template: the Jinja template given as data.template cannot render" in err
  assert not loads
