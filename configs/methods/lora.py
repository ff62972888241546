"""Thin copy: the config ships with the package, in
mllm_tune/configs/methods/lora.py."""
from mllm_tune.configs.methods.lora import *  # noqa: F401,F403
