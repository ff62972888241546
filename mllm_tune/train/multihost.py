"""Multi-process start-up: `jax.distributed.initialize()` when launched that way.

Detected from the environment: `MLLM_COORDINATOR` (+ `MLLM_NUM_PROCESSES`, `MLLM_PROCESS_ID`) for
our local/SLURM scripts, or JAX's own auto-detection on Cloud TPU / SLURM when
`MLLM_DISTRIBUTED=auto`. A single process needs nothing."""
from __future__ import annotations

import logging
import os

import jax

log = logging.getLogger(__name__)


def maybe_initialize_distributed() -> bool:
  coord = os.environ.get("MLLM_COORDINATOR")
  if coord:
    jax.distributed.initialize(coordinator_address=coord,
                               num_processes=int(os.environ["MLLM_NUM_PROCESSES"]),
                               process_id=int(os.environ["MLLM_PROCESS_ID"]))
  elif os.environ.get("MLLM_DISTRIBUTED") == "auto":
    jax.distributed.initialize()
  else:
    return False
  log.info("process %d of %d, %d global devices", jax.process_index(), jax.process_count(),
           jax.device_count())
  return True
