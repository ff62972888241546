"""Thin copy: the config ships with the package, in
mllm_tune/configs/models/llm_only.py."""
from mllm_tune.configs.models.llm_only import *  # noqa: F401,F403
