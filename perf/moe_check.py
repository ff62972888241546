"""The mixture-of-experts dispatch on the device: `jax.lax.ragged_dot` checked and timed.

    python perf/moe_check.py            # on a GPU (perf/gpu_targets.sh stage `moe`)
    python perf/moe_check.py --tiny     # CPU dry run on small shapes

XLA:CPU lowers `ragged_dot` densely (every row against every expert); on GPU it becomes
`chlo.ragged_dot`, which the CPU suite never reaches. This script:

1. checks `models/grouped_matmul.grouped_matmul` (forward, input gradient, per-expert weight gradient) in
   float32 against a float64 NumPy loop over the expert groups, with empty groups included;
2. times one Qwen3-VL-30B-A3B-shaped MoE layer (8192 tokens, 128 experts, top 8, D 2048,
   F 768), forward + backward of `routed_experts` in bfloat16 with every expert weight trained,
   and reports its achieved TFLOP/s from the active-expert FLOPs (3 x 2 x N k (D 2F + F D))
   beside a dense bf16 matmul of the same FLOPs, so the grouped kernel's efficiency reads as a
   ratio to the device's plain GEMM. Prints one JSON line; exits 1 when a check fails.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

FULL = dict(tokens=8192, experts=128, top_k=8, hidden=2048, inter=768, rows=4096)
TINY = dict(tokens=256, experts=8, top_k=2, hidden=64, inter=32, rows=192)


def check_grouped_matmul(p) -> float:
  """Largest relative error of grouped_matmul's output and gradients against float64 NumPy."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from mllm_tune.models.grouped_matmul import grouped_matmul
  rng = np.random.RandomState(0)
  e, m, d, f = p["experts"], p["rows"], p["hidden"], p["inter"]
  sizes = rng.multinomial(m, rng.dirichlet(np.ones(e) * 0.5)).astype(np.int32)
  sizes[: max(1, e // 8)] = 0  # some experts get no rows
  sizes[-1] += m - sizes.sum()
  x = rng.randn(m, d).astype(np.float32)
  w = (rng.randn(e, d, f) / np.sqrt(d)).astype(np.float32)
  r = rng.randn(m, f).astype(np.float32)
  loss = lambda x, w: jnp.sum(grouped_matmul(x, w, jnp.asarray(sizes)) * r)
  with jax.default_matmul_precision("highest"):
    y = jax.jit(lambda x, w: grouped_matmul(x, w, jnp.asarray(sizes)))(x, w)
    dx, dw = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, w)
  x64, w64, r64 = x.astype(np.float64), w.astype(np.float64), r.astype(np.float64)
  y_ref, dx_ref, dw_ref = np.zeros((m, f)), np.zeros((m, d)), np.zeros((e, d, f))
  start = 0
  for g, n in enumerate(sizes):
    rows = slice(start, start + n)
    y_ref[rows] = x64[rows] @ w64[g]
    dx_ref[rows] = r64[rows] @ w64[g].T
    dw_ref[g] = x64[rows].T @ r64[rows]
    start += n
  rel = lambda a, b: float(np.linalg.norm(np.asarray(a, np.float64) - b)
                           / max(np.linalg.norm(b), 1e-30))
  return max(rel(y, y_ref), rel(dx, dx_ref), rel(dw, dw_ref))


def timed(fn, *args, reps: int = 10) -> float:
  import jax
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return sorted(times)[len(times) // 2]


def time_layer(p) -> dict:
  import jax
  import jax.numpy as jnp
  from mllm_tune.models.moe import route, routed_experts
  n, e, k, d, f = p["tokens"], p["experts"], p["top_k"], p["hidden"], p["inter"]
  keys = jax.random.split(jax.random.key(0), 5)
  bf = jnp.bfloat16
  x = jax.random.normal(keys[0], (n, d), bf)
  router = (jax.random.normal(keys[1], (d, e)) / d ** 0.5).astype(bf)
  gate_up = (jax.random.normal(keys[2], (e, d, 2 * f)) / d ** 0.5).astype(bf)
  down = (jax.random.normal(keys[3], (e, f, d)) / f ** 0.5).astype(bf)
  r = jax.random.normal(keys[4], (n, d), bf)

  def loss(x, gate_up, down):
    w, idx = route(x @ router, k)
    y = routed_experts(x, w, idx, gate_up, down, "silu")
    return jnp.sum((y * r).astype(jnp.float32))
  step = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
  flops = 3 * 2 * n * k * (d * 2 * f + f * d)
  a = jax.random.normal(keys[0], (n * k, d), bf)
  b = jax.random.normal(keys[1], (d, 9 * f), bf)  # 2 N k D 9F = the layer's 3 x 2 N k D 3F
  dense = jax.jit(lambda a, b: a @ b)
  t_moe, t_dense = timed(step, x, gate_up, down), timed(dense, a, b)
  return {"moe_layer_fwd_bwd_ms": round(t_moe * 1e3, 3),
          "moe_tflops": round(flops / t_moe / 1e12, 1),
          "dense_same_flops_ms": round(t_dense * 1e3, 3),
          "dense_tflops": round(flops / t_dense / 1e12, 1),
          "moe_over_dense_time": round(t_moe / t_dense, 2)}


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--tiny", action="store_true")
  args = ap.parse_args()
  import jax
  p = TINY if args.tiny else FULL
  err = check_grouped_matmul(p)
  ok = err <= 1e-5
  out = {"backend": jax.devices()[0].platform, "device": jax.devices()[0].device_kind,
         "jax": jax.__version__, **{k: v for k, v in p.items()},
         "grouped_matmul_max_rel_err": float(f"{err:.3g}"),
         "grouped_matmul_check": "PASS" if ok else "FAIL", **time_layer(p)}
  print(json.dumps(out))
  sys.exit(0 if ok else 1)


if __name__ == "__main__":
  main()
