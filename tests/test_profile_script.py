"""bench/profile_step.py's parsing: HLO op table and per-thunk times from a real trace."""
from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "bench"))
import profile_step  # noqa: E402


def test_thunk_times_name_the_ops_of_the_optimized_module(tmp_path):
  f = jax.jit(lambda a, b: jnp.tanh(a @ b).sum())
  a = jnp.ones((256, 256))
  ops = profile_step.op_table(f.lower(a, a).compile().as_text())
  assert "f32[256,256]{1,0}" in {shape for shape, _ in ops.values()}
  f(a, a).block_until_ready()
  with jax.profiler.trace(str(tmp_path)):
    for _ in range(3):
      f(a, a).block_until_ready()
  times = profile_step.thunk_times(str(tmp_path), ops)
  assert times and all(ns > 0 for ns in times.values())
  # the executed thunks are instructions of the optimized module, with shape and origin known
  assert all(ops[n][1].startswith("jit(<lambda>)/") and ops[n][0].startswith("f32")
             for n in times), (times, ops)
