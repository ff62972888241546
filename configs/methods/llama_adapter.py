"""Thin copy: the config ships with the package, in
mllm_tune/configs/methods/llama_adapter.py."""
from mllm_tune.configs.methods.llama_adapter import *  # noqa: F401,F403
