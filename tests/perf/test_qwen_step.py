"""perf/qwen_step.py end to end on the `tiny` preset (CPU, float32, one checkpoint that both
workers load): the two frameworks train the same Qwen2.5-VL-shaped LoRA step, so after the same
steps on the same batch the last losses agree (transformers + peft is the reference), and the
report's row has a finite speed ratio."""
from __future__ import annotations

import os
import re
import subprocess
import sys

from tests.helpers import ROOT


def test_tiny_run_trains_the_same_step_as_transformers_and_peft():
  cmd = [sys.executable, os.path.join(ROOT, "perf", "qwen_step.py"), "--preset", "tiny",
         "--results", ""]
  r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900,
                     env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert r.returncode == 0, r.stderr[-3000:]
  m = re.search(r"ours ([0-9.]+), transformers ([0-9.]+) \(same checkpoint\)", r.stdout)
  assert m, r.stdout[-2000:]
  ours, theirs = float(m.group(1)), float(m.group(2))
  assert abs(ours - theirs) < 1e-3 * theirs, (ours, theirs)
  row = next(ln for ln in r.stdout.splitlines() if ln.startswith("| tiny |"))
  ratio = float(row.split("|")[5].strip(" *x"))  # a tiny model on a shared host: any value
  assert 0 < ratio < float("inf"), row
