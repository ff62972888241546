"""Thin copy: the config ships with the package, in
mllm_tune/configs/methods/hft.py."""
from mllm_tune.configs.methods.hft import *  # noqa: F401,F403
