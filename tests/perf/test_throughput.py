"""perf/throughput.py end to end on the `tiny` preset in bf16 with random weights (the path a
GPU run takes, here on CPU): both frameworks' workers run every training/generation mode and the
report has a row per mode with a finite ratio, the exact parameter count and the analytic FLOPs
that the MFU columns use. Also the compiler-option parsing of perf/profile_step.py."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.helpers import ROOT

sys.path.insert(0, os.path.join(ROOT, "perf"))
import profile_step  # noqa: E402
import throughput  # noqa: E402


def test_tiny_bf16_random_init_run_reports_lora_and_generation(tmp_path):
  out = tmp_path / "tiny.md"
  cmd = [sys.executable, os.path.join(ROOT, "perf", "throughput.py"), "--preset", "tiny",
         "--init", "random", "--dtype", "bfloat16", "--modes", "lora,generate",
         "--steps", "4", "--repeats", "1", "--batch", "2", "--seq", "40", "--new_tokens", "3",
         "--lora_rank", "4", "--results", str(out)]
  r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900,
                     env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert r.returncode == 0, r.stderr[-3000:]
  text = out.read_text()
  import torch
  from transformers import LlavaForConditionalGeneration
  with torch.device("meta"):
    n = sum(p.numel() for p in LlavaForConditionalGeneration(
        throughput.hf_config(throughput.PRESETS["tiny"])).parameters())
  assert f"{n / 1e6:.1f}M params, bfloat16" in text and "LoRA r=4" in text
  # ("full" is the same worker path as "lora" with every leaf trained; left out for time)
  for row in ("| lora step |", "| generate (greedy, KV cache) |"):
    line = next(ln for ln in text.splitlines() if ln.startswith(row))
    ratio = float(line.split("|")[4])  # timings of a tiny model on a shared host: any value
    assert 0 < ratio < float("inf"), line
  assert re.search(r"\| lora step \| \d+ ms \(\d+ tok/s\)", text)


def test_load_mode_needs_a_checkpoint():
  r = subprocess.run([sys.executable, os.path.join(ROOT, "perf", "throughput.py"), "--init",
                      "random", "--modes", "load"], capture_output=True, text=True, timeout=300)
  assert r.returncode != 0 and "--modes load needs --init checkpoint" in r.stderr


def test_flops_count_a_lora_step_as_frozen_backward_plus_adapters():
  s = throughput.PRESETS["tiny"]
  full = throughput.flops_per_step("full", 2, 40, s)
  lora = throughput.flops_per_step("lora", 2, 40, s, lora_r=4)
  # full = 3x forward; LoRA = forward + LLM input-gradient pass (< 2x forward) + adapters
  assert full / 3 < lora < full
  assert throughput.flops_per_step("lora", 2, 40, s, lora_r=8) > lora


def test_compiler_options_parse_bools_and_strings():
  assert profile_step.compiler_options(["xla_cpu_use_xnnpack=false", "a=", "b=True"]) == {
      "xla_cpu_use_xnnpack": False, "a": "", "b": True}
  with pytest.raises(SystemExit, match="KEY=VALUE"):
    profile_step.compiler_options(["novalue"])
