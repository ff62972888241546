"""Tiny random Qwen2-VL / Qwen2.5-VL reference models (transformers) and image batches for them,
built from configs (no processor: random patch rows, grids and matching placeholder runs)."""
from __future__ import annotations

import numpy as np
import torch
from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLConfig,
                          Qwen2VLForConditionalGeneration)

from tests.helpers.hf_tiny import INIT, _llm_kwargs, padded_batch

IMAGE, VIDEO, VSTART, VEND = 95, 96, 97, 98
TOKENS = dict(image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VSTART,
              vision_end_token_id=VEND)
PATCH_DIM = 3 * 2 * 14 * 14
# (t, h, w) patch grids: 12, 1 and 6 merged tokens
GRIDS = [(1, 6, 8), (1, 2, 2), (1, 4, 6)]


def _text(**kw) -> dict:
  return _llm_kwargs(rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                      "mrope_section": [2, 1, 1]}, **kw)


def qwen2_vl(**llm_kw) -> Qwen2VLForConditionalGeneration:
  torch.manual_seed(7)
  cfg = Qwen2VLConfig(text_config=_text(**llm_kw), vision_config=dict(
      depth=2, embed_dim=32, hidden_size=32, num_heads=4, mlp_ratio=2, patch_size=14,
      spatial_merge_size=2, temporal_patch_size=2, initializer_range=INIT),
      tie_word_embeddings=llm_kw.get("tie_word_embeddings", False), **TOKENS)
  return Qwen2VLForConditionalGeneration(cfg).eval()


def qwen2_5_vl(fullatt=(1,), window_size=56, **llm_kw) -> Qwen2_5_VLForConditionalGeneration:
  """3 blocks, full attention in `fullatt` only; windows of 56 px = 2 x 2 merged tokens, so the
  grids above are cut into partial windows."""
  torch.manual_seed(8)
  cfg = Qwen2_5_VLConfig(text_config=_text(**llm_kw), vision_config=dict(
      depth=3, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=32,
      patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=window_size,
      fullatt_block_indexes=list(fullatt), tokens_per_second=2, initializer_range=INIT),
      tie_word_embeddings=llm_kw.get("tie_word_embeddings", False), **TOKENS)
  return Qwen2_5_VLForConditionalGeneration(cfg).eval()


def image_run(grid) -> list[int]:
  t, h, w = grid
  return [VSTART] + [IMAGE] * (t * h * w // 4) + [VEND]


def batch(side="right", grids=GRIDS, seed=0) -> dict:
  """Row 0: two images of different grids; row 1: one image; row 2: text only. Processor-like
  numpy output: input_ids, attention_mask, pixel_values (patches, 1176), image_grid_thw,
  mm_token_type_ids."""
  rows = [[1, 5] + image_run(grids[0]) + [7, 8] + image_run(grids[1]) + [9],
          [1, 3] + image_run(grids[2]) + [4, 6, 11, 12],
          [1, 20, 21, 22, 23]]
  ids, mask = padded_batch(rows, side)
  rng = np.random.RandomState(seed)
  n = sum(t * h * w for t, h, w in grids)
  return {"input_ids": ids, "attention_mask": mask,
          "pixel_values": rng.randn(n, PATCH_DIM).astype(np.float32),
          "image_grid_thw": np.asarray(grids, np.int64),
          "mm_token_type_ids": (ids == IMAGE).astype(np.int64)}


def torch_inputs(enc: dict) -> dict:
  return {k: torch.tensor(v) for k, v in enc.items()}


def hf_logits(model, enc: dict) -> np.ndarray:
  with torch.no_grad():
    return model(**torch_inputs(enc)).logits.float().numpy()
