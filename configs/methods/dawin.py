"""Thin copy: the config ships with the package, in
mllm_tune/configs/methods/dawin.py."""
from mllm_tune.configs.methods.dawin import *  # noqa: F401,F403
