#!/usr/bin/env bash
# Run the same training command on every worker of a Cloud TPU VM pod slice.
#   launch/tpu_vm.sh TPU_NAME ZONE --config=configs/experiments/X.py --config.method.rank=16
# Assumes the repo is checked out at the same path on all workers (REPO_DIR) and set up with
#   python3 -m venv .venv && .venv/bin/pip install -e . 'jax[tpu]'
# JAX discovers the pod topology itself (MLLM_DISTRIBUTED=auto -> jax.distributed.initialize());
# each host reads its own slice of the data; checkpoints go to a path all hosts can write
# (pass --config.run_dir=gs://bucket/run for orbax on GCS).
set -euo pipefail
TPU=${1:?usage: tpu_vm.sh TPU_NAME ZONE [mllm-tune train args...]}; ZONE=${2:?zone}; shift 2
REPO_DIR=${REPO_DIR:-~/mllm_tune}
ARGS=$(printf '%q ' "$@")
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command \
  "cd $REPO_DIR && MLLM_DISTRIBUTED=auto .venv/bin/mllm-tune train $ARGS --no-progress"
