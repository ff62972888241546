"""LLaVA with a SigLIP tower and a Qwen2 LLM (qkv bias, often tied embeddings), e.g.
llava-interleave-qwen style checkpoints in the HF Llava layout."""
from mllm_tune.configs import base


def get_config():
  m = base.get_config().model
  m.source = "hf"
  m.dtype = "bfloat16"
  m.frozen_dtype = "bfloat16"
  m.remat_policy = "dots_with_no_batch_dims_saveable"
  return m
