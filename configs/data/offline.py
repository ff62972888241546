"""Thin copy: the config ships with the package, in
mllm_tune/configs/data/offline.py."""
from mllm_tune.configs.data.offline import *  # noqa: F401,F403
