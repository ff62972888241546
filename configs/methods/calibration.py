"""Thin copy: the config ships with the package, in
mllm_tune/configs/methods/calibration.py."""
from mllm_tune.configs.methods.calibration import *  # noqa: F401,F403
