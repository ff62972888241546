#!/usr/bin/env bash
# Issue 9's GPU targets in one device session (~10 min on an H100/H200; both frameworks, random
# weights, bf16, 2048 tokens). Writes bench/results/gpu_lora7b.md and gpu_full1p5b.md (or under
# $OUT). Needs jax[cuda], torch, transformers and peft installed; run from the repository root:
#   bash bench/gpu_targets.sh
# Targets: LLaVA-1.5-7B shape, LoRA r=128: >= 45% MFU and >= 1.5x transformers+peft at no more
# peak memory; ~1.5B full fine-tuning: >= 45% MFU. --peak_gflops 989000 = H100/H200 dense bf16.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
# fail fast (before minutes of device time) when the image lacks a package; pure-Python ones
# (flax, optax, msgpack, rich, etils, ...) can be carried in a directory on PYTHONPATH
python - <<'PY'
import importlib, sys
missing = [m for m in ("jax", "flax", "optax", "torch", "transformers", "peft")
           if importlib.util.find_spec(m) is None]
if missing:
  sys.exit(f"missing packages: {missing}")
import jax, torch
if jax.devices()[0].platform != "gpu" or not torch.cuda.is_available():
  sys.exit(f"no GPU: jax sees {jax.devices()}, torch.cuda {torch.cuda.is_available()}")
print("jax", jax.__version__, jax.devices(), "torch", torch.__version__)
PY
mkdir -p "$OUT"
COMMON=(--platform gpu --init random --dtype bfloat16 --seq 2048 --steps 8 --repeats 1
        --peak_gflops "${PEAK_GFLOPS:-989000}")
python bench/throughput.py "${COMMON[@]}" --preset llava7b --batch "${BATCH_7B:-4}" \
  --lora_rank 128 --modes lora --results "$OUT/gpu_lora7b.md"
python bench/throughput.py "${COMMON[@]}" --preset llava1p5b --batch "${BATCH_1P5B:-8}" \
  --modes full --results "$OUT/gpu_full1p5b.md"
