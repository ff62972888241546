"""Thin copy: the config ships with the package, in
mllm_tune/configs/models/tiny.py."""
from mllm_tune.configs.models.tiny import *  # noqa: F401,F403
