"""LLaVA-1.5-style checkpoints (CLIP ViT-L/14-336 + Llama/Vicuna), e.g. llava-hf/llava-1.5-7b-hf
converted or downloaded by the user. Use as `c.model = llava_llama.get_config()`."""
from mllm_tune.configs import base


def get_config():
  m = base.get_config().model
  m.source = "hf"
  m.dtype = "bfloat16"          # compute
  m.param_dtype = "float32"     # load, then...
  m.frozen_dtype = "bfloat16"   # ...keep the frozen base in bf16, trainable leaves fp32
  m.remat_policy = "dots_with_no_batch_dims_saveable"
  return m
