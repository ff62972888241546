"""Moved to `mllm_tune/benchmark/config.py` (shipped in the package); this file keeps the path
`configs/bench/offline.py[:tiny|demo]` working."""
from mllm_tune.benchmark.config import ALL_LINEARS, LLM_LINEARS, get_config, methods  # noqa: F401
