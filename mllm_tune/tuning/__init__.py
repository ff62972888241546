"""Tuning methods behind one API: `mt.tuning.get(name, **cfg)` (see api.py for the contract)."""
from mllm_tune.tuning import api, select
from mllm_tune.tuning.api import (Compose, Method, MethodError, build_optimizer, combine, compose,
                                  from_config, get, log_trainable, names, partition,
                                  trainable_table)
from mllm_tune.tuning import lora  # noqa: F401  (registers lora, rslora, dora, pissa)
from mllm_tune.tuning import lora_peft  # noqa: F401  (PEFT LORA export/import)
from mllm_tune.tuning import sculpt  # noqa: F401  (lorasculpt)
from mllm_tune.tuning import vera  # noqa: F401  (vera + PEFT VERA)
from mllm_tune.tuning import selective  # noqa: F401  (freeze, bitfit, ln_tuning, hft, spider, ...)
from mllm_tune.tuning import additive  # noqa: F401  (adapter, parallel_adapter, prompt_tuning,
#   prefix_tuning, ia3, llama_adapter, vpt + PEFT IA3/PROMPT_TUNING/PREFIX_TUNING/ADAPTION_PROMPT)
# forgetting penalties and post-hoc methods (METHODS.md 5, 6); gift registers penalty "gift"
from mllm_tune.tuning import penalties, fisher, merging, dawin, calibration, gift

__all__ = ["api", "select", "Compose", "Method", "MethodError", "build_optimizer", "combine",
           "compose", "from_config", "get", "log_trainable", "names", "partition",
           "trainable_table", "penalties", "fisher", "merging", "dawin", "calibration", "gift"]
