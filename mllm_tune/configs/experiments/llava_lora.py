"""LoRA instruction tuning of a LLaVA checkpoint on LLaVA-format JSON data (packed batches).

mllm-tune train --config=configs/experiments/llava_lora.py \\
  --config.model.path=/path/to/llava-hf-dir --config.data.json_path=/data/llava.json \\
  --config.data.image_folder=/data/images
"""
from mllm_tune.configs import base
from mllm_tune.configs.data import llava_instruct
from mllm_tune.configs.methods import lora


def get_config():
  c = base.get_config()
  c.run_dir = "runs/llava_lora"
  c.model.source = "hf"
  c.method = lora.get_config()
  c.method.rank = 16
  c.method.alpha = 32.0
  c.method.targets = r"llm/layers_\d+/(attn/(q|k|v|o)_proj|mlp/(gate|up|down)_proj)"
  c.data = llava_instruct.get_config()
  c.optimizer.learning_rate = 2e-4
  c.optimizer.warmup_steps = 0
  c.train.steps = 1000
  c.train.save_every = 200
  return c
