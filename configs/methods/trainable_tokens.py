"""Thin copy: the config ships with the package, in
mllm_tune/configs/methods/trainable_tokens.py."""
from mllm_tune.configs.methods.trainable_tokens import *  # noqa: F401,F403
