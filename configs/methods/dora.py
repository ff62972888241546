"""Thin copy: the config ships with the package, in
mllm_tune/configs/methods/dora.py."""
from mllm_tune.configs.methods.dora import *  # noqa: F401,F403
