"""Thin copy: the config ships with the package, in
mllm_tune/configs/penalties/ewc_lwf.py."""
from mllm_tune.configs.penalties.ewc_lwf import *  # noqa: F401,F403
