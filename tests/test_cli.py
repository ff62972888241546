"""`mllm-tune convert` in both directions, `export` (PEFT, merged, native, Model Tailor) and
the README's demo command."""
from __future__ import annotations

import os

import numpy as np
import torch
from transformers import LlavaForConditionalGeneration

from mllm_tune.cli import main
from tests.helpers import hf_tiny


def test_convert_hf_to_native_and_back_to_bf16_hf(tmp_path, capsys):
  hf_model = hf_tiny.clip_llama()
  src, native, back = (str(tmp_path / n) for n in ("hf", "native", "back"))
  hf_model.save_pretrained(src)
  assert main(["convert", src, native]) == 0
  assert os.path.isfile(os.path.join(native, "mllm_config.json"))
  assert main(["convert", native, back, "--dtype", "bfloat16", "--layout", "legacy"]) == 0
  assert "-> " in capsys.readouterr().out
  loaded, info = LlavaForConditionalGeneration.from_pretrained(back, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"]
  ref = hf_model.state_dict()
  for name, p in loaded.state_dict().items():
    assert p.dtype == torch.bfloat16, name
    torch.testing.assert_close(p, ref[name].to(torch.bfloat16), rtol=0, atol=0)


def test_convert_reports_bad_input_and_exits_2(tmp_path, capsys):
  os.makedirs(tmp_path / "empty")
  assert main(["convert", str(tmp_path / "empty"), str(tmp_path / "out")]) == 2
  assert "no config.json" in capsys.readouterr().err


def test_ctrl_c_ends_with_a_message_and_status_130_not_a_traceback(monkeypatch, capsys):
  from mllm_tune import cli

  def interrupted(args):
    raise KeyboardInterrupt
  monkeypatch.setattr(cli, "_convert", interrupted)
  assert main(["convert", "a", "b"]) == 130
  assert "interrupted: mllm-tune convert stopped (Ctrl-C)" in capsys.readouterr().err


def test_demo_runs_offline_and_round_trips(tmp_path, capsys):
  assert main(["demo", "--smoke", "--out", str(tmp_path / "demo")]) == 0
  out = capsys.readouterr().out
  assert "HF round trip bit-exact: True" in out
  printed = out.split("greedy tokens")[1].split("]]")[0].split(":")[1]
  tokens = np.array(printed.replace("[", " ").replace("]", " ").split(), dtype=int)
  assert tokens.size == 2 * 16 and ((0 <= tokens) & (tokens < 256)).all()
  assert os.path.isfile(os.path.join(tmp_path, "demo", "hf", "model.safetensors"))


EXPORT_EXPERIMENT = '''
import ml_collections
from configs.experiments import llava_lora


def get_config():
  c = llava_lora.get_config()
  lora = c.method.to_dict()
  lora.update(rank=4, alpha=8.0)
  # the LLaVA-1.5 LoRA recipe: LoRA on the LLM beside the projector trained in full
  c.method = ml_collections.ConfigDict({"methods": [lora, {"name": "freeze",
                                                           "preset": "projector"}]})
  return c
'''


def test_export_a_trained_run_as_peft_merged_and_native(tmp_path, capsys):
  """Train LoRA + projector (the LLaVA recipe) for a few steps, then `mllm-tune export --best`:
  peft loads the adapter on the transformers base with our logits, transformers loads the merged
  directory (tokenizer / processor files copied) with our logits, and `convert` on the run
  directory points to `export`."""
  import json
  import shutil
  from peft import PeftModel
  import mllm_tune as mt
  from mllm_tune.tuning.files import load_adapters
  from tests.helpers.data import CHATML_GEN, llava_model_dir, mixed_records, write_llava_dataset
  from tests.helpers.peft_ref import torch_logits
  base = llava_model_dir(str(tmp_path), chat_template=CHATML_GEN)
  records, images = mixed_records(24)
  data = write_llava_dataset(str(tmp_path / "data"), records, images)
  exp = tmp_path / "exp.py"
  exp.write_text(EXPORT_EXPERIMENT)
  run = str(tmp_path / "run")
  assert main(["train", f"--config={exp}", "--no-progress", f"--config.model.path={base}",
               f"--config.data.json_path={data}", f"--config.data.image_folder={tmp_path}/data/"
               "images", "--config.data.template=chatml", "--config.data.seq_len=96",
               "--config.data.batch_size=4", "--config.data.num_workers=0",
               "--config.train.steps=4", "--config.train.save_every=0",
               "--config.train.eval_every=2", "--config.train.best_metric=eval/loss",
               "--config.train.best_mode=min", "--config.eval.kind=llava_json",
               f"--config.eval.json_path={data}", "--config.eval.num_batches=1",
               "--config.optimizer.learning_rate=1e-2", f"--config.run_dir={run}"]) == 0
  capsys.readouterr()
  with open(os.path.join(run, "metrics.jsonl")) as f:
    evals = {r["step"]: r["eval/loss"] for r in map(json.loads, f) if "eval/loss" in r}
  assert sorted(evals) == [2, 4]
  best = min(evals, key=lambda s: (evals[s], s))

  assert main(["convert", run, str(tmp_path / "x")]) == 2
  assert "use `mllm-tune export" in capsys.readouterr().err
  out = {k: str(tmp_path / k) for k in ("peft", "merged", "native")}
  assert main(["export", run, "--best", "--peft", out["peft"], "--merged", out["merged"],
               "--native", out["native"]]) == 0
  printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert printed["step"] == best

  trained = mt.load_run(run, step=best)
  model, variables = trained.model, trained.variables
  per = model.config.image_seq_len
  img = model.config.image_token_id
  ids, mask = hf_tiny.padded_batch([[1, 5] + [img] * per + [7, 8, 9, 10], [1, 20, 21, 22, 23]])
  px = np.random.RandomState(0).randn(1, 28, 28, 3).astype(np.float32)
  batch, real = (ids, mask, px), mask.astype(bool)
  ours = np.asarray(model.apply(variables, ids, mask, pixel_values=px))
  _, base_params = mt.load_pretrained(base)
  assert np.abs(ours - np.asarray(model.apply({"params": base_params}, ids, mask,
                                              pixel_values=px))).max() > 1e-3  # it trained
  proj = lambda p: np.asarray(p["projector"]["linear_1"]["kernel"])  # noqa: E731
  assert np.abs(proj(variables["params"]) - proj(base_params)).max() > 1e-4  # in full

  with open(os.path.join(out["peft"], "adapter_config.json")) as f:
    assert json.load(f)["modules_to_save"] == ["model.multi_modal_projector.linear_1",
                                               "model.multi_modal_projector.linear_2"]
  peft_model = PeftModel.from_pretrained(LlavaForConditionalGeneration.from_pretrained(base),
                                         out["peft"]).eval()
  np.testing.assert_allclose(ours[real], torch_logits(peft_model, batch)[real], atol=1e-4)

  merged = LlavaForConditionalGeneration.from_pretrained(out["merged"]).eval()
  np.testing.assert_allclose(ours[real], hf_tiny.hf_logits(merged, ids, mask, px)[real],
                             atol=1e-4)
  aux = sorted(f for f in os.listdir(base) if f not in ("config.json", "model.safetensors",
                                                        "generation_config.json"))
  assert "tokenizer.json" in aux and "preprocessor_config.json" in aux
  assert any("chat_template" in f or "tokenizer_config" in f for f in aux)
  for f in aux:
    with open(os.path.join(base, f), "rb") as a, open(os.path.join(out["merged"], f), "rb") as b:
      assert a.read() == b.read(), f

  method, native = load_adapters(out["native"], base_params)
  np.testing.assert_allclose(np.asarray(model.apply(native, ids, mask, pixel_values=px)), ours,
                             atol=1e-6)

  # Model Tailor on the run's newest weights, calibrated on the run's first training batches
  tailored = str(tmp_path / "tailored")
  assert main(["export", run, "--merged", tailored, "--tailor", "sparsity=0.5",
               "num_samples=8"]) == 0
  printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert printed["step"] == 4 and printed["sparsity"] == 0.5
  assert printed["calibration_batches"] == 2 and printed["tailored_layers"] == [0, 1]
  from mllm_tune import pytree
  from mllm_tune.data.loader import make_batches
  from mllm_tune.train.runs import read_config
  latest = mt.load_run(run)
  d = {**read_config(run).data.to_dict(), "image_groups": 1, "prefetch": 0, "num_workers": 0}
  it = make_batches(d, base, model.config)
  calib = [next(it) for _ in range(2)]
  want = mt.tuning.get("model_tailor", sparsity=0.5).tailor(
      model, base_params, latest.method.merge(latest.variables), calib)
  _, got = mt.load_pretrained(tailored)
  flat_got, flat_want, flat0 = (pytree.flatten(t) for t in (got, want, base_params))
  for p in flat_want:
    np.testing.assert_array_equal(flat_got[p], flat_want[p], err_msg=p)
  q = "llm/layers/attn/q_proj/kernel"  # patched: neither the base nor the fine-tuned kernel
  assert not np.array_equal(flat_got[q], flat0[q])
  assert not np.array_equal(flat_got[q], pytree.flatten(latest.method.merge(
      latest.variables))[q])
  for p in flat0:  # the projector goes back to the base (Model Tailor's released code)
    if p.startswith("projector/"):
      np.testing.assert_array_equal(flat_got[p], flat0[p])
  assert os.path.isfile(os.path.join(tailored, "tokenizer.json"))
  assert main(["export", run, "--merged", str(tmp_path / "t2"), "--peft", str(tmp_path / "p2"),
               "--tailor"]) == 2
  assert "give --merged DIR only" in capsys.readouterr().err
  shutil.rmtree(run)
