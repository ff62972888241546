"""Thin copy: the config ships with the package, in
mllm_tune/configs/penalties/mas.py."""
from mllm_tune.configs.penalties.mas import *  # noqa: F401,F403
