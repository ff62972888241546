"""Thin copy: the config ships with the package, in
mllm_tune/configs/methods/ln_tuning.py."""
from mllm_tune.configs.methods.ln_tuning import *  # noqa: F401,F403
