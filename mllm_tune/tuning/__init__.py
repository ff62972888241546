"""Tuning methods behind one API: `mt.tuning.get(name, **cfg)` (see api.py for the contract)."""
from mllm_tune.tuning import api, select
from mllm_tune.tuning.api import (Compose, Method, MethodError, build_optimizer, combine, compose,
                                  get, log_trainable, names, partition, trainable_table)
from mllm_tune.tuning import lora  # noqa: F401  (registers lora, rslora, dora, pissa)
from mllm_tune.tuning import lora_peft  # noqa: F401  (PEFT LORA export/import)

__all__ = ["api", "select", "Compose", "Method", "MethodError", "build_optimizer", "combine",
           "compose", "get", "log_trainable", "names", "partition", "trainable_table"]
