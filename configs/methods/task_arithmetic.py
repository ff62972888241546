"""Thin copy: the config ships with the package, in
mllm_tune/configs/methods/task_arithmetic.py."""
from mllm_tune.configs.methods.task_arithmetic import *  # noqa: F401,F403
