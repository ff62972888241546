"""Thin copy: the config ships with the package, in
mllm_tune/configs/experiments/recipe_gift.py."""
from mllm_tune.configs.experiments.recipe_gift import *  # noqa: F401,F403
