"""Thin copy: the config ships with the package, in
mllm_tune/configs/methods/prefix_tuning.py."""
from mllm_tune.configs.methods.prefix_tuning import *  # noqa: F401,F403
