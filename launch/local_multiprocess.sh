#!/usr/bin/env bash
# Run N local processes that form one JAX job (jax.distributed over localhost), e.g. to test the
# multi-host path on one machine:
#   launch/local_multiprocess.sh 2 --config=configs/experiments/tiny_full.py --config.train.steps=10
# Each process gets DEVICES_PER_PROC forced CPU devices unless JAX_PLATFORMS says otherwise, and
# glibc huge pages for large blocks (XLA:CPU's per-call temporaries fault in far fewer pages).
# PYTHON: the interpreter (default: this checkout's .venv/bin/python if there is one, else
# python); process i writes its output to $LOG_DIR/proc_i.log (LOG_DIR default: .).
set -euo pipefail
N=${1:?usage: local_multiprocess.sh NUM_PROCESSES [mllm-tune train args...]}; shift
PORT=${PORT:-$((20000 + RANDOM % 20000))}
DEVICES_PER_PROC=${DEVICES_PER_PROC:-1}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ -z "${PYTHON:-}" && -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; fi
PY=${PYTHON:-python}
LOG_DIR=${LOG_DIR:-.}
mkdir -p "$LOG_DIR"
pids=()
for ((i = 0; i < N; i++)); do
  JAX_PLATFORMS=${JAX_PLATFORMS:-cpu} \
  GLIBC_TUNABLES=${GLIBC_TUNABLES:-glibc.malloc.hugetlb=1} \
  XLA_FLAGS="--xla_force_host_platform_device_count=${DEVICES_PER_PROC} ${XLA_FLAGS:-}" \
  MLLM_COORDINATOR="127.0.0.1:${PORT}" MLLM_NUM_PROCESSES="$N" MLLM_PROCESS_ID="$i" \
    "$PY" -m mllm_tune.cli train "$@" > "$LOG_DIR/proc_${i}.log" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
tail -n 3 "$LOG_DIR/proc_0.log"
exit $status
