"""Thin copy: the config ships with the package, in
mllm_tune/configs/methods/model_tailor.py."""
from mllm_tune.configs.methods.model_tailor import *  # noqa: F401,F403
