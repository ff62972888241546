"""Thin copy: the config ships with the package, in
mllm_tune/configs/penalties/gift.py."""
from mllm_tune.configs.penalties.gift import *  # noqa: F401,F403
