"""Moved to `mllm_tune.benchmark`; this alias keeps `mllm_tune.bench.runner` importable for scripts."""
