"""Moved to `mllm_tune.benchmark.runner`; alias for scripts that import the old path."""
from mllm_tune.benchmark.runner import *  # noqa: F401,F403
from mllm_tune.benchmark.runner import Base, Sets, load_base, measure, prepare_sets  # noqa: F401
