"""perf/moe_check.py (the GPU stage `moe`) as its CPU dry run: the grouped-matmul check against
float64 NumPy passes (empty expert groups included), a deliberately wrong product fails it, and
the layer timing reports finite numbers in its JSON line."""
from __future__ import annotations

import json
import os
import subprocess
import sys


from tests.helpers import ROOT


def test_dry_run_checks_the_grouped_matmul_and_times_the_layer():
  r = subprocess.run([sys.executable, os.path.join(ROOT, "perf", "moe_check.py"), "--tiny"],
                     cwd=ROOT, capture_output=True, text=True, timeout=600,
                     env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert r.returncode == 0, r.stderr[-3000:]
  out = json.loads(r.stdout.strip().splitlines()[-1])
  assert out["grouped_matmul_check"] == "PASS" and out["grouped_matmul_max_rel_err"] < 1e-5
  assert out["moe_layer_fwd_bwd_ms"] > 0 and out["dense_same_flops_ms"] > 0


def test_the_check_catches_a_wrong_grouping(monkeypatch):
  sys.path.insert(0, os.path.join(ROOT, "perf"))
  import moe_check
  from mllm_tune.models import grouped_matmul
  # every row against expert 0: right shapes, wrong groups
  monkeypatch.setattr(grouped_matmul, "grouped_matmul", lambda x, w, sizes: x @ w[0])
  assert moe_check.check_grouped_matmul(moe_check.TINY) > 0.1
