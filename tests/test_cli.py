"""`mllm-tune convert` in both directions and the README's demo command."""
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


def test_demo_runs_offline_and_round_trips(tmp_path, capsys):
  assert main(["demo", "--smoke", "--out", str(tmp_path / "demo")]) == 0
  out = capsys.readouterr().out
  assert "HF round trip bit-exact: True" in out
  printed = out.split("greedy tokens")[1].split("]]")[0].split(":")[1]
  tokens = np.array(printed.replace("[", " ").replace("]", " ").split(), dtype=int)
  assert tokens.size == 2 * 16 and ((0 <= tokens) & (tokens < 256)).all()
  assert os.path.isfile(os.path.join(tmp_path, "demo", "hf", "model.safetensors"))
