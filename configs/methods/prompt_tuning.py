"""Thin copy: the config ships with the package, in
mllm_tune/configs/methods/prompt_tuning.py."""
from mllm_tune.configs.methods.prompt_tuning import *  # noqa: F401,F403
