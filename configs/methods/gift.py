"""Thin copy: the config ships with the package, in
mllm_tune/configs/methods/gift.py."""
from mllm_tune.configs.methods.gift import *  # noqa: F401,F403
