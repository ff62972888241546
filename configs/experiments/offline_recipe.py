"""Thin copy: the config ships with the package, in
mllm_tune/configs/experiments/offline_recipe.py."""
from mllm_tune.configs.experiments.offline_recipe import *  # noqa: F401,F403
