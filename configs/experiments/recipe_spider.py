"""Thin copy: the config ships with the package, in
mllm_tune/configs/experiments/recipe_spider.py."""
from mllm_tune.configs.experiments.recipe_spider import *  # noqa: F401,F403
