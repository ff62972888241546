"""Thin copies of `mllm_tune/configs/penalties/` (the configs ship with the package)."""
