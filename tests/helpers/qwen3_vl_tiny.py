"""A tiny random Qwen3-VL reference model (transformers) and image batches for it: a 3-block
vision tower (patch 16) with deepstack layers [0, 2] and a 5 x 5 learned position grid, and a
3-layer Qwen3 text model whose head_dim (16) is not hidden / heads (8), with interleaved M-RoPE
sections [4, 2, 2] (slots 0..7: t at 0, 3, 6, 7; h at 1, 4; w at 2, 5)."""
from __future__ import annotations

import torch
from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

from tests.helpers import qwen_vl_tiny as qt
from tests.helpers.hf_tiny import INIT, _llm_kwargs

PATCH_DIM = 3 * 2 * 16 * 16
DEEPSTACK = (0, 2)


def qwen3_vl(tokens: dict = qt.TOKENS, deepstack=DEEPSTACK,
             **llm_kw) -> Qwen3VLForConditionalGeneration:
  torch.manual_seed(9)
  text = _llm_kwargs(**{"num_hidden_layers": 3, "head_dim": 16, "rope_parameters": {
      "rope_type": "default", "rope_theta": 1e4, "mrope_section": [4, 2, 2],
      "mrope_interleaved": True}, **llm_kw})
  cfg = Qwen3VLConfig(text_config=text, vision_config=dict(
      depth=3, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=32,
      patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=25,
      deepstack_visual_indexes=list(deepstack), initializer_range=INIT),
      tie_word_embeddings=llm_kw.get("tie_word_embeddings", False), **tokens)
  model = Qwen3VLForConditionalGeneration(cfg).eval()
  with torch.no_grad():  # HF initialises q/k norms and biases to constants: make them matter
    for name, p in model.named_parameters():
      if name.endswith(("q_norm.weight", "k_norm.weight", ".bias")) or "norm" in name:
        p.add_(0.1 * torch.randn_like(p))
  return model


def batch(side="right", seed=0) -> dict:
  """`qwen_vl_tiny.batch` (two images of different grids, one image, text only) with 16-pixel
  patch rows."""
  return qt.batch(side, seed=seed, patch_dim=PATCH_DIM)


def qwen3_vl_moe(tokens: dict = qt.TOKENS, **llm_kw):
  """Qwen3-VL-MoE: the same tower and a 3-layer Qwen3 text model whose MLPs are 6 experts of
  width 24, 2 per token. The text config keeps its own `tie_word_embeddings` default (True, and
  saved as such) while the model ties on the top-level flag (False unless given)."""
  from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration
  torch.manual_seed(11)
  tie = llm_kw.pop("tie_word_embeddings", False)
  text = _llm_kwargs(**{"num_hidden_layers": 3, "head_dim": 16, "rope_parameters": {
      "rope_type": "default", "rope_theta": 1e4, "mrope_section": [4, 2, 2],
      "mrope_interleaved": True}, "num_experts": 6, "num_experts_per_tok": 2,
      "moe_intermediate_size": 24, **llm_kw})
  cfg = Qwen3VLMoeConfig(text_config=text, vision_config=dict(
      depth=3, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=32,
      patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=25,
      deepstack_visual_indexes=list(DEEPSTACK), initializer_range=INIT),
      tie_word_embeddings=tie, **tokens)
  model = Qwen3VLMoeForConditionalGeneration(cfg).eval()
  with torch.no_grad():  # HF initialises norms and biases to constants: make them matter
    for name, p in model.named_parameters():
      if name.endswith((".bias", "mlp.gate.weight")) or "norm" in name:
        p.add_(0.1 * torch.randn_like(p))
  return model
