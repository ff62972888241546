"""Thin copy: the config ships with the package, in
mllm_tune/configs/methods/vpt.py."""
from mllm_tune.configs.methods.vpt import *  # noqa: F401,F403
