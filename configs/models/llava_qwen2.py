"""Thin copy: the config ships with the package, in
mllm_tune/configs/models/llava_qwen2.py."""
from mllm_tune.configs.models.llava_qwen2 import *  # noqa: F401,F403
