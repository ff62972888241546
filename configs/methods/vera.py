"""Thin copy: the config ships with the package, in
mllm_tune/configs/methods/vera.py."""
from mllm_tune.configs.methods.vera import *  # noqa: F401,F403
