"""Thin copy: the config ships with the package, in
mllm_tune/configs/models/llava_llama.py."""
from mllm_tune.configs.models.llava_llama import *  # noqa: F401,F403
