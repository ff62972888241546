"""Thin copy: the config ships with the package, in
mllm_tune/configs/methods/ia3.py."""
from mllm_tune.configs.methods.ia3 import *  # noqa: F401,F403
