"""Thin copy: the config ships with the package, in
mllm_tune/configs/experiments/tiny_full.py."""
from mllm_tune.configs.experiments.tiny_full import *  # noqa: F401,F403
