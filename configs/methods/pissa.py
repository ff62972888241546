"""Thin copy: the config ships with the package, in
mllm_tune/configs/methods/pissa.py."""
from mllm_tune.configs.methods.pissa import *  # noqa: F401,F403
