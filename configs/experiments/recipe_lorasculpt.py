"""Thin copy: the config ships with the package, in
mllm_tune/configs/experiments/recipe_lorasculpt.py."""
from mllm_tune.configs.experiments.recipe_lorasculpt import *  # noqa: F401,F403
