"""Thin copies of `mllm_tune/configs/models/` (the configs ship with the package)."""
