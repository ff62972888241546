"""LLaMA-Adapter (docs/methods.md §3.6; Zhang et al. 2023): K = 10 zero-gated prompts in the top 30
blocks (of LLaMA-7B's 32; set adapter_layers <= the LLM's depth). Gate as peft (raw); the
official code uses `gate_fn='tanh'`."""
import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.name = "llama_adapter"
  c.adapter_len = 10
  c.adapter_layers = 30
  c.gate_fn = "identity"
  return c
