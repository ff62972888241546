"""Smoke experiment: LoRA on a tiny random Llama-style model over the synthetic token stream.

mllm-tune train --config=configs/experiments/tiny_lora.py --config.method.rank=8"""
from mllm_tune.configs import base
from mllm_tune.configs.methods import lora


def get_config():
  c = base.get_config()
  c.run_dir = "runs/tiny_lora"
  c.method = lora.get_config()
  c.method.targets = r"llm/layers_\d+/(attn/(q|k|v|o)_proj|mlp/(gate|up|down)_proj)"
  c.method.rank = 4
  c.method.alpha = 8.0
  c.optimizer.learning_rate = 3e-3
  c.optimizer.schedule = "constant"
  c.train.steps = 40
  c.train.save_every = 20
  return c
