"""Thin copies of `mllm_tune/configs/data/` (the configs ship with the package)."""
