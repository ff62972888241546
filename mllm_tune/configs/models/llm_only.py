"""Bare decoder LLMs (LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM) for text-only
tuning; the params live under `llm/` exactly as in LLaVA, so method targets carry over."""
from mllm_tune.configs import base


def get_config():
  m = base.get_config().model
  m.source = "hf"
  m.dtype = "bfloat16"
  m.frozen_dtype = "bfloat16"
  m.remat_policy = "dots_with_no_batch_dims_saveable"
  return m
