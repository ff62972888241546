"""Thin copy: the config ships with the package, in
mllm_tune/configs/methods/freeze.py."""
from mllm_tune.configs.methods.freeze import *  # noqa: F401,F403
