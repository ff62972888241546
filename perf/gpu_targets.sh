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
# and, outside the default set (`STAGES` picks stages by name, in the order given):
#   checks   bf16 cuDNN paths (Qwen ViT segment/window masks, M-RoPE LLM) against `lse`
#            (perf/gpu_checks.py)          -> $OUT/gpu_checks.txt
#   generate7b_xla  the generation run, ours only, with `--attention_impl xla` (decode A/B)
#                                          -> $OUT/gpu_generate7b_xla.json
#   suite    the whole test suite on the GPU, 8 workers (T_SUITE seconds, default 400)
#                                          -> $OUT/gpu_suite.log
#   qwen7b   Qwen2.5-VL-7B shape, LoRA r=128, 4 x 2048, bf16, vs transformers + peft
#            (perf/qwen_step.py)           -> $OUT/gpu_qwen7b.md (+ _runs.json)
#   moe      the mixture-of-experts dispatch (`ragged_dot`): grouped matmul and gradients vs
#            float64 NumPy, a Qwen3-VL-30B-A3B-shaped layer timed (perf/moe_check.py)
#                                          -> $OUT/gpu_moe.json
# e.g.  STAGES="qwen7b checks tests full1p5b generate7b" bash perf/gpu_targets.sh
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
  T_TESTS=300; T_LORA=300; T_FULL=300; T_GEN=300; T_PROF=300; T_CHECKS=300; T_QWEN=300
  T_MOE=300
  PQ=tiny; QARGS=(--platform cpu --dtype float32 --init random)
else
  OUT=${OUT:-results}
  P7=llava7b; P15=llava1p5b; B7=${BATCH_7B:-4}; B15=${BATCH_1P5B:-8}; SEQ=2048; NEW=64
  PLAT=gpu
  TESTS=(tests/models/test_attention.py tests/models/test_parity_hf.py
         tests/losses/test_chunked.py tests/models/test_fused_ops.py
         tests/models/test_parity_anyres.py tests/models/test_parity_qwen_vl.py
         tests/models/test_anyres.py)
  T_TESTS=${T_TESTS:-110}; T_LORA=140; T_FULL=100; T_GEN=110; T_PROF=70; T_CHECKS=60
  T_QWEN=${T_QWEN:-180}; T_MOE=${T_MOE:-60}; PQ=qwen7b; QARGS=(--platform gpu --dtype bfloat16 --init random)
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
run_stage() {
  case $1 in
    tests)  # several pytest workers share the GPU: no preallocation of 75% of its memory each
      stage tests "$T_TESTS" env XLA_PYTHON_CLIENT_PREALLOCATE=false \
        bash -c "python3 -m pytest -q -p no:cacheprovider ${TESTS[*]} -n 4 --dist loadfile \
                 > '$OUT/gpu_tests.log' 2>&1; rc=\$?; tail -3 '$OUT/gpu_tests.log'; exit \$rc" ;;
    lora7b) stage lora7b "$T_LORA" python3 perf/throughput.py "${COMMON[@]}" --preset "$P7" \
              --batch "$B7" --lora_rank 128 --modes lora --results "$OUT/gpu_lora7b.md" ;;
    full1p5b) stage full1p5b "$T_FULL" python3 perf/throughput.py "${COMMON[@]}" \
                --preset "$P15" --batch "$B15" --modes full --results "$OUT/gpu_full1p5b.md" ;;
    generate7b) stage generate7b "$T_GEN" python3 perf/throughput.py "${COMMON[@]}" \
                  --preset "$P7" --batch "$B7" --modes generate \
                  --results "$OUT/gpu_generate7b.md" ;;
    profile1p5b) stage profile1p5b "$T_PROF" bash -c "python3 perf/profile_step.py --mode full \
        --preset $P15 --init random --dtype bfloat16 --batch $B15 --seq $SEQ --top 25 \
        > '$OUT/gpu_profile_full1p5b.txt' 2>&1; rc=\$?; \
        tail -4 '$OUT/gpu_profile_full1p5b.txt'; exit \$rc" ;;
    checks) stage checks "$T_CHECKS" bash -c "python3 perf/gpu_checks.py \
              $([[ $PLAT == cpu ]] && echo --tiny) > '$OUT/gpu_checks.txt' 2>&1; rc=\$?; \
              tail -5 '$OUT/gpu_checks.txt'; exit \$rc" ;;
    moe) stage moe "$T_MOE" bash -c "python3 perf/moe_check.py \
           $([[ $PLAT == cpu ]] && echo --tiny) > '$OUT/gpu_moe.json'; rc=\$?; \
           cat '$OUT/gpu_moe.json'; exit \$rc" ;;
    qwen7b) stage qwen7b "$T_QWEN" python3 perf/qwen_step.py "${QARGS[@]}" --preset "$PQ" \
              --batch "$B7" --seq "$SEQ" --lora_rank 128 --steps 6 --repeats 1 \
              --results "$OUT/gpu_qwen7b.md" ;;
    generate7b_xla)  # A/B of the decode attention: ours only, every call on plain XLA
      stage generate7b_xla "$T_GEN" bash -c "python3 -c \"import sys; sys.path.insert(0, 'perf'); \
        from bench_models import PRESETS, hf_config; \
        hf_config(PRESETS['$P7']).save_pretrained('$OUT/.gen_xla_model')\" && \
        python3 perf/throughput.py --worker jax --mode generate --model_dir '$OUT/.gen_xla_model' \
          ${COMMON[*]} --preset $P7 --batch $B7 --steps 4 --attention_impl xla \
          --out '$OUT/gpu_generate7b_xla.json' && cat '$OUT/gpu_generate7b_xla.json'; \
        rc=\$?; rm -rf '$OUT/.gen_xla_model'; exit \$rc" ;;
    suite)  # the whole suite on the GPU (each result line in the log, so a cut run still counts)
      stage suite "${T_SUITE:-400}" env XLA_PYTHON_CLIENT_PREALLOCATE=false \
        bash -c "python3 -m pytest -q -rfE -p no:cacheprovider tests -n 8 --dist loadfile \
                 -o console_output_style=count > '$OUT/gpu_suite.log' 2>&1; rc=\$?; \
                 tail -15 '$OUT/gpu_suite.log'; exit \$rc" ;;
    *) echo "unknown stage $1"; status=1 ;;
  esac
}
for s in ${STAGES:-tests lora7b full1p5b generate7b profile1p5b}; do run_stage "$s"; done
echo "results in $OUT"; ls -la "$OUT"
exit $status
