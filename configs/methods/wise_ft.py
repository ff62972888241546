"""Thin copy: the config ships with the package, in
mllm_tune/configs/methods/wise_ft.py."""
from mllm_tune.configs.methods.wise_ft import *  # noqa: F401,F403
