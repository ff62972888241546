"""Thin copy: the config ships with the package, in
mllm_tune/configs/methods/lorasculpt.py."""
from mllm_tune.configs.methods.lorasculpt import *  # noqa: F401,F403
