"""Moved to `mllm_tune.benchmark`; alias that keeps `mllm_tune.bench.runner` importable."""
