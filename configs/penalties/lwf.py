"""Thin copy: the config ships with the package, in
mllm_tune/configs/penalties/lwf.py."""
from mllm_tune.configs.penalties.lwf import *  # noqa: F401,F403
