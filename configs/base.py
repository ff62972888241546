"""Thin copy: the config ships with the package, in
mllm_tune/configs/base.py."""
from mllm_tune.configs.base import *  # noqa: F401,F403
