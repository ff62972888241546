"""Baseline: LoRA (r=8 on every linear layer of LLM, tower and projector) on the offline
benchmark, forgetting tracked as it goes (configs/experiments/offline_recipe.py)."""
from mllm_tune.configs.experiments import offline_recipe


def get_config():
  return offline_recipe.get_config("lora")
