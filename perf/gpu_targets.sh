#!/usr/bin/env bash
# Every GPU measurement in one command (at most ~8 minutes on one H100/H200; each stage under its
# own `timeout`, so one failure or overrun does not lose the others):
#   1. the tests that compare numbers against references (attention, HF parity, chunked CE,
#      fused ops) on the GPU              -> $OUT/gpu_tests.log
#   2. LLaVA-1.5-7B shape, LoRA r=128, 4 x 2048, bf16, vs transformers + peft
#                                          -> $OUT/gpu_lora7b.md (+ _runs.json)
#   3. ~1.5B LLaVA, full fine-tuning, 8 x 2048, bf16, vs transformers
#                                          -> $OUT/gpu_full1p5b.md (+ _runs.json)
#   4. 7B shape, greedy generation, batch 4, 64 new tokens
#                                          -> $OUT/gpu_generate7b.md (+ _runs.json)
#   5. per-op device time of the 1.5B full step (perf/profile_step.py)
#                                          -> $OUT/gpu_profile_full1p5b.txt
# Random weights (each framework builds them on its device), default attention ("auto").
# Run from anywhere:   bash perf/gpu_targets.sh          (OUT defaults to results)
# CPU dry run of the same stages on tiny models (what CI-less checks use before device time):
#                      bash perf/gpu_targets.sh --tiny   (OUT defaults to a temporary folder)
# Targets (issue "GPU: default paths"): 7B LoRA >= 50% MFU, >= 2.0x peft, <= 0.8x its memory;
# 1.5B full >= 50% MFU, >= 1.3x, <= 1.0x memory; generation >= 5x. --peak_gflops 989000 = H100/
# H200 dense bf16.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
if [[ "${1:-}" == "--tiny" ]]; then
  OUT=${OUT:-$(mktemp -d)}
  export JAX_PLATFORMS=cpu
  P7=tiny; P15=tiny; B7=2; B15=2; SEQ=64; NEW=4; PLAT=cpu; TESTS=(tests/models/test_fused_ops.py)
  T_TESTS=300; T_LORA=300; T_FULL=300; T_GEN=300; T_PROF=300
else
  OUT=${OUT:-results}
  P7=llava7b; P15=llava1p5b; B7=${BATCH_7B:-4}; B15=${BATCH_1P5B:-8}; SEQ=2048; NEW=64
  PLAT=gpu
  TESTS=(tests/models/test_attention.py tests/models/test_parity_hf.py
         tests/losses/test_chunked.py tests/models/test_fused_ops.py)
  T_TESTS=110; T_LORA=140; T_FULL=100; T_GEN=110; T_PROF=70
  # fail fast (before minutes of device time) when the image lacks a package or a GPU
  python3 - <<'PY' || exit 1
import importlib.util, sys
missing = [m for m in ("jax", "flax", "optax", "torch", "transformers", "peft", "ml_collections",
                       "pytest") if importlib.util.find_spec(m) is None]
if missing:
  sys.exit(f"missing packages: {missing}")
import jax, torch
if jax.devices()[0].platform != "gpu" or not torch.cuda.is_available():
  sys.exit(f"no GPU: jax sees {jax.devices()}, torch.cuda {torch.cuda.is_available()}")
print("jax", jax.__version__, jax.devices(), "torch", torch.__version__, flush=True)
PY
fi
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
COMMON=(--platform "$PLAT" --init random --dtype bfloat16 --seq "$SEQ" --steps 8 --repeats 1
        --new_tokens "$NEW" --peak_gflops "${PEAK_GFLOPS:-989000}")
status=0
stage() {  # stage NAME SECONDS CMD...: run CMD under a time limit, report, keep going
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "=== $name (limit ${limit}s)"
  timeout --kill-after=10 "$limit" "$@"
  local rc=$?
  echo "=== $name: exit $rc after $((SECONDS - t0)) s"
  [[ $rc -eq 0 ]] || status=1
}
# several pytest workers share the GPU: no preallocation of 75% of its memory each
stage tests "$T_TESTS" env XLA_PYTHON_CLIENT_PREALLOCATE=false \
  bash -c "python3 -m pytest -q -p no:cacheprovider ${TESTS[*]} -n 4 --dist loadfile \
           > '$OUT/gpu_tests.log' 2>&1; rc=\$?; tail -3 '$OUT/gpu_tests.log'; exit \$rc"
stage lora7b "$T_LORA" python3 perf/throughput.py "${COMMON[@]}" --preset "$P7" \
  --batch "$B7" --lora_rank 128 --modes lora --results "$OUT/gpu_lora7b.md"
stage full1p5b "$T_FULL" python3 perf/throughput.py "${COMMON[@]}" --preset "$P15" \
  --batch "$B15" --modes full --results "$OUT/gpu_full1p5b.md"
stage generate7b "$T_GEN" python3 perf/throughput.py "${COMMON[@]}" --preset "$P7" \
  --batch "$B7" --modes generate --results "$OUT/gpu_generate7b.md"
stage profile1p5b "$T_PROF" bash -c "python3 perf/profile_step.py --mode full --preset $P15 \
  --init random --dtype bfloat16 --batch $B15 --seq $SEQ --top 25 \
  > '$OUT/gpu_profile_full1p5b.txt' 2>&1; rc=\$?; tail -4 '$OUT/gpu_profile_full1p5b.txt'; exit \$rc"
echo "results in $OUT"; ls -la "$OUT"
exit $status
