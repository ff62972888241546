"""Numerical checks of the GPU-only attention paths (run by perf/gpu_targets.sh on the device).

    python perf/gpu_checks.py            # on a GPU; exits 1 when a check fails
    python perf/gpu_checks.py --tiny     # CPU dry run (every call takes `lse` there)

The CPU suite cannot reach cuDNN, and in float32 (the parity tests' dtype) `attention_impl="auto"`
takes `lse` on a GPU too. So this script runs the bf16 paths where "auto" picks cuDNN and
compares them with the same model on `lse`, both against a float32 `lse` reference:

1. Qwen2.5-VL vision tower + merger (segment mask per image, window mask in the windowed
   blocks, full attention in `fullatt_block_indexes`), forward and the gradient of the vision
   weights (full fine-tuning differentiates the tower);
2. the whole Qwen2.5-VL model's logits (M-RoPE positions; cuDNN's causal kernel with the padding
   mask as a bias in the LLM).

A check passes when the bf16 "auto" result's relative error (Frobenius norm) against float32 is
at most 1.5x the bf16 `lse` result's error plus 1e-3: cuDNN may round differently, but it must
compute the same function (a wrong mask gives errors of order 1).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "perf"))

CHECK = dict(v_depth=4, v_hidden=1280, v_inter=3420, v_heads=16, window=112, fullatt=[1, 3],
             hidden=1024, inter=2816, layers=2, heads=8, kv=2, vocab=32000, mrope=[16, 24, 24],
             theta=1e6, grids=[(1, 32, 32), (1, 24, 40), (1, 40, 24), (1, 28, 28)])
TINY = dict(CHECK, v_depth=2, v_hidden=64, v_inter=128, v_heads=2, fullatt=[1], hidden=64,
            inter=128, heads=4, kv=2, vocab=512, mrope=[2, 3, 3],
            grids=[(1, 8, 8), (1, 4, 12), (1, 12, 4)])


def rel(a, b) -> float:
  import numpy as np
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--tiny", action="store_true")
  ap.add_argument("--seq", type=int, default=1024)
  args = ap.parse_args()
  import logging
  logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
  logging.getLogger("mllm_tune.attention").setLevel(logging.INFO)  # the choice per call site
  import jax
  import jax.numpy as jnp
  import mllm_tune as mt
  from mllm_tune.models import build_model, init_params
  from mllm_tune.models.config import config_from_hf, with_runtime
  import qwen_step
  p = TINY if args.tiny else CHECK
  seq = 128 if args.tiny else args.seq
  hf = qwen_step.hf_config(p)
  d = json.loads(hf.to_json_string())
  cfg32 = config_from_hf(d, "check", dtype="float32", param_dtype="float32")
  enc = qwen_step.make_batch(d, p, len(p["grids"]), seq)
  m32 = build_model(with_runtime(cfg32, attention_impl="lse"))
  params32 = init_params(m32, jax.random.key(0))
  kw = {k: jnp.asarray(v) for k, v in mt.hf_inputs(m32, enc).items()}
  params16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params32)
  cfg16 = config_from_hf(d, "check", dtype="bfloat16", param_dtype="bfloat16")
  models = {"f32": (m32, params32),
            "bf16 lse": (build_model(with_runtime(cfg16, attention_impl="lse")), params16),
            "bf16 auto": (build_model(with_runtime(cfg16, attention_impl="auto")), params16)}
  vis_args = (kw["pixel_values"], kw["vision_segment_ids"], kw["vision_pos_hw"],
              kw.get("vision_window_ids"))
  r = jax.random.normal(jax.random.key(1), (kw["pixel_values"].shape[0] // 4, p["hidden"]))

  def feats(model, params):
    def f(vp):
      return model.apply({"params": {**params, "vision": vp}}, *vis_args,
                         method=model.image_features)
    out, vjp = jax.vjp(f, params["vision"])
    (g,) = vjp(r.astype(out.dtype))
    return out, g

  def logits(model, params):
    return model.apply({"params": params}, kw["input_ids"], **{k: v for k, v in kw.items()
                                                                if k != "input_ids"})
  res = {}
  with jax.default_matmul_precision("highest"):
    for name, (model, params) in models.items():
      out, g = jax.jit(feats, static_argnums=0)(model, params)
      res[name] = (out, g, jax.jit(logits, static_argnums=0)(model, params))
  ok = True
  print(f"backend {jax.devices()[0].platform}; patches {kw['pixel_values'].shape[0]}, "
        f"batch {kw['input_ids'].shape}")
  for i, what in enumerate(["vision features", "vision weight gradient", "logits"]):
    ref = res["f32"][i]
    flat = lambda t: jnp.concatenate([x.astype(jnp.float32).ravel() for x in jax.tree.leaves(t)])
    e_lse = rel(flat(res["bf16 lse"][i]), flat(ref))
    e_auto = rel(flat(res["bf16 auto"][i]), flat(ref))
    good = e_auto <= 1.5 * e_lse + 1e-3
    ok &= good
    print(f"{what}: relative error vs float32: bf16 auto {e_auto:.2e}, bf16 lse {e_lse:.2e} "
          f"-> {'PASS' if good else 'FAIL'}")
  sys.exit(0 if ok else 1)


if __name__ == "__main__":
  main()
