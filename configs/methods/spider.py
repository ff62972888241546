"""Thin copy: the config ships with the package, in
mllm_tune/configs/methods/spider.py."""
from mllm_tune.configs.methods.spider import *  # noqa: F401,F403
