"""Thin copy: the config ships with the package, in
mllm_tune/configs/methods/grad_topk.py."""
from mllm_tune.configs.methods.grad_topk import *  # noqa: F401,F403
