"""Thin copy: the config ships with the package, in
mllm_tune/configs/methods/bitfit.py."""
from mllm_tune.configs.methods.bitfit import *  # noqa: F401,F403
