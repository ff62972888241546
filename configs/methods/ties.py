"""Thin copy: the config ships with the package, in
mllm_tune/configs/methods/ties.py."""
from mllm_tune.configs.methods.ties import *  # noqa: F401,F403
