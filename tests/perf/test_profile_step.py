"""perf/profile_step.py: HLO op table and per-op times from a real trace, and the script end to
end on the tiny preset in bf16 with random weights (the path a GPU run takes, here on CPU)."""
from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp

from tests.helpers import ROOT

sys.path.insert(0, os.path.join(ROOT, "perf"))
import profile_step  # noqa: E402


def test_thunk_times_name_the_ops_of_the_optimized_module(tmp_path):
  f = jax.jit(lambda a, b: jnp.tanh(a @ b).sum())
  a = jnp.ones((256, 256))
  ops = profile_step.op_table(f.lower(a, a).compile().as_text())
  assert "f32[256,256]{1,0}" in {shape for shape, _, _ in ops.values()}
  f(a, a).block_until_ready()
  with jax.profiler.trace(str(tmp_path)):
    for _ in range(3):
      f(a, a).block_until_ready()
  times = profile_step.op_times(str(tmp_path), ops)
  assert times and all(ns > 0 for ns in times.values())
  # the executed thunks are instructions of the optimized module, with shape and origin known
  assert all(ops[n][1].startswith("jit(<lambda>)/") and ops[n][0].startswith("f32")
             for n in times), (times, ops)
  assert "matmul" in {ops[n][2] for n in times}  # the a @ b dot is classified


def test_profile_script_runs_the_throughput_step_and_groups_op_time():
  r = subprocess.run([sys.executable, os.path.join(ROOT, "perf", "profile_step.py"), "--mode",
                      "full", "--preset", "tiny", "--init", "random", "--dtype", "bfloat16",
                      "--batch", "2", "--seq", "40", "--top", "5"], cwd=ROOT, capture_output=True,
                     text=True, timeout=600, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert r.returncode == 0, r.stderr[-3000:]
  out = r.stdout
  assert "full step (tiny, bfloat16, batch 2 x 40" in out and "compiled memory: arguments" in out
  groups = out.strip().splitlines()[-1]
  shares = [int(x.split()[-1].rstrip("%")) for x in groups.split(", ")]
  assert "matmul" in groups and 95 <= sum(shares) <= 105, groups
