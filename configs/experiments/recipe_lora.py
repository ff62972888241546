"""Thin copy: the config ships with the package, in
mllm_tune/configs/experiments/recipe_lora.py."""
from mllm_tune.configs.experiments.recipe_lora import *  # noqa: F401,F403
