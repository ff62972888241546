"""Thin copies of `mllm_tune/configs/methods/` (the configs ship with the package)."""
