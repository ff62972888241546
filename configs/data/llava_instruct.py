"""Thin copy: the config ships with the package, in
mllm_tune/configs/data/llava_instruct.py."""
from mllm_tune.configs.data.llava_instruct import *  # noqa: F401,F403
