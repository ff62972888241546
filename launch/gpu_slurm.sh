#!/usr/bin/env bash
# SLURM, several GPU nodes, one process per node driving all its GPUs:
#   sbatch --nodes=2 --gpus-per-node=8 launch/gpu_slurm.sh --config=configs/experiments/X.py
#SBATCH --job-name=mllm_tune
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
set -euo pipefail
REPO_DIR=${REPO_DIR:-$SLURM_SUBMIT_DIR}
HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
PORT=${PORT:-12355}
srun --ntasks-per-node=1 bash -c "cd $REPO_DIR && \
  MLLM_COORDINATOR=$HEAD:$PORT MLLM_NUM_PROCESSES=$SLURM_NNODES MLLM_PROCESS_ID=\$SLURM_PROCID \
  .venv/bin/mllm-tune train $(printf '%q ' "$@") --no-progress"
