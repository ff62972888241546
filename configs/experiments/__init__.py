"""Thin copies of `mllm_tune/configs/experiments/` (the configs ship with the package)."""
