"""Thin copy: the config ships with the package, in
mllm_tune/configs/penalties/l2sp.py."""
from mllm_tune.configs.penalties.l2sp import *  # noqa: F401,F403
