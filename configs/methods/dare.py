"""Thin copy: the config ships with the package, in
mllm_tune/configs/methods/dare.py."""
from mllm_tune.configs.methods.dare import *  # noqa: F401,F403
