"""The README walkthrough, end to end: the commands and files between its `walkthrough` markers
run verbatim (tiny sizes appended to `mllm-tune train`) in a fresh directory, on a tiny
checkpoint written here the way a user gets it: a llava-hf-style directory saved by
transformers 5 (image processor inside processor_config.json, llava-1.5-hf's list-style chat
template, generation_config.json with its eos). The package alone is on the path (no clone's
`configs/`), so the config file's `from configs ...` is the shipped one.

Train (killed after step 3, then the same command resumes it), export the selected step, and
generate with transformers + peft and with mllm_tune: the same reply."""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys

from tests.helpers import ROOT
from tests.helpers.data import LLAVA15_HF, chatml_tokenizer, image_bytes, write_llava_dataset

TINY = ["--no-progress", "--config.train.steps=4", "--config.train.eval_every=2",
        "--config.train.save_every=2", "--config.train.log_every=1",
        "--config.data.seq_len=64", "--config.data.batch_size=2",
        "--config.data.num_workers=0", "--config.eval.batch_size=2",
        "--config.eval.max_new_tokens=3", "--config.optimizer.learning_rate=1e-3"]


def readme_steps() -> list[tuple[str, str]]:
  """("file", (name, text)) for python blocks headed `# name.py`, ("run", argv) for each
  command of bash blocks, in README order, between the walkthrough markers."""
  text = open(os.path.join(ROOT, "README.md")).read()
  body = text.split("<!-- walkthrough -->", 1)[1].split("<!-- /walkthrough -->", 1)[0]
  steps = []
  for lang, block in re.findall(r"```(\w+)\n(.*?)```", body, re.S):
    if lang == "python":
      name = block.splitlines()[0].lstrip("# ").strip()
      assert name.endswith(".py"), block
      steps.append(("file", (name, block)))
    elif lang == "bash":
      for line in block.replace("\\\n", " ").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
          steps.append(("run", shlex.split(line)))
  return steps


def write_checkpoint(path: str) -> None:
  """A tiny CLIP + Llama LLaVA as transformers saves it, with LlavaProcessor (transformers 5
  layout: no preprocessor_config.json) and llava-1.5-hf's chat template."""
  import torch
  from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                            LlavaForConditionalGeneration, LlavaProcessor)
  tok = chatml_tokenizer(LLAVA15_HF)
  torch.manual_seed(0)
  vc = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, image_size=28, patch_size=14)
  tc = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   max_position_embeddings=256, initializer_range=0.1)
  model = LlavaForConditionalGeneration(LlavaConfig(
      vision_config=vc, text_config=tc, image_token_index=tok.convert_tokens_to_ids("<image>")))
  model.generation_config.eos_token_id = tok.eos_token_id
  model.generation_config.pad_token_id = tok.pad_token_id
  model.save_pretrained(path)
  ip = CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
  LlavaProcessor(ip, tok, patch_size=14, vision_feature_select_strategy="default",
                 num_additional_image_tokens=1, chat_template=LLAVA15_HF).save_pretrained(path)
  assert not os.path.exists(os.path.join(path, "preprocessor_config.json"))


def write_data(root: str) -> None:
  answers = ["A red square.", "Two dogs.", "A blue car.", "Nothing at all.", "A cat.",
             "Three trees.", "The sea.", "A green ball.", "Snow.", "A bird.", "Sand."]
  images, files = {}, {"train": [], "val": [], "general": []}
  for i, answer in enumerate(answers):
    images[f"{i}.png"] = image_bytes(20 + i, 16 + i % 3, seed=i)
    rec = {"id": str(i), "image": f"{i}.png",
           "conversations": [{"from": "human", "value": "<image>\nWhat is shown?"},
                             {"from": "gpt", "value": answer}]}
    files["train" if i < 7 else "val" if i < 9 else "general"].append(rec)
  for name, recs in files.items():
    write_llava_dataset(root, recs, images, name=f"{name}.json")


def test_readme_walkthrough_end_to_end(tmp_path):
  steps = readme_steps()
  kinds = [s[1][0] if s[0] == "file" else s[1][0] for s in steps]
  assert kinds == ["my_lora.py", "mllm-tune", "mllm-tune", "generate_hf.py",
                   "generate_ours.py", "python", "python"], kinds
  site = tmp_path / "site"
  site.mkdir()
  os.symlink(os.path.join(ROOT, "mllm_tune"), site / "mllm_tune")
  work = tmp_path / "work"
  work.mkdir()
  write_checkpoint(str(work / "ckpt" / "llava"))
  write_data(str(work / "data"))
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  env.update(PYTHONPATH=str(site), JAX_PLATFORMS="cpu")

  def run(argv, extra_env=None):
    cmd = ([sys.executable, "-m", "mllm_tune.cli", *argv[1:]] if argv[0] == "mllm-tune"
           else [sys.executable, *argv[1:]])
    return subprocess.run(cmd, cwd=work, env={**env, **(extra_env or {})}, capture_output=True,
                          text=True, timeout=900)

  outputs = {}
  for kind, step in steps:
    if kind == "file":
      (work / step[0]).write_text(step[1])
      continue
    if step[:2] == ["mllm-tune", "train"]:
      killed = run(step + TINY, {"MLLM_DEBUG_KILL": "3"})
      assert killed.returncode == -9, killed.stderr[-3000:]
      res = run(step + TINY)  # the same command again: resumes
      assert res.returncode == 0, res.stderr[-3000:]
      assert "resumed from" in res.stderr and "at step 2" in res.stderr
      summary = json.loads(res.stdout.splitlines()[0])
      report = open(work / "runs" / "my_lora" / "report.md").read()
      assert summary["status"] == "done"
      assert f"**Step {summary['best_step']}** wins" in report
      continue
    res = run(step)
    assert res.returncode == 0, (step, res.stderr[-3000:])
    outputs[step[-1]] = res.stdout
  export = json.loads(outputs["out/merged"].strip().splitlines()[-1])
  assert export["step"] == summary["best_step"]
  hf_reply = outputs["generate_hf.py"].rstrip("\n").splitlines()[-1]
  ours = outputs["generate_ours.py"].rstrip("\n").splitlines()[-1]
  assert hf_reply == ours and len(set(hf_reply)) > 2, (hf_reply, ours)
