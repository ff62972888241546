"""Thin copy: the config ships with the package, in
mllm_tune/configs/methods/rslora.py."""
from mllm_tune.configs.methods.rslora import *  # noqa: F401,F403
