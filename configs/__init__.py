"""Thin copies of `mllm_tune/configs/` (the configs ship with the package)."""
