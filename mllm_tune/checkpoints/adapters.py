"""Moved to `mllm_tune.tuning.files` (native adapter files); alias kept for the documented path."""
from mllm_tune.tuning.files import *  # noqa: F401,F403
from mllm_tune.tuning.files import load_adapters, method_config, save_adapters  # noqa: F401
