"""Thin copy: the config ships with the package, in
mllm_tune/configs/penalties/online_ewc.py."""
from mllm_tune.configs.penalties.online_ewc import *  # noqa: F401,F403
