"""Thin copy: the config ships with the package, in
mllm_tune/configs/penalties/kl.py."""
from mllm_tune.configs.penalties.kl import *  # noqa: F401,F403
