"""Tiny random LLaVA-NeXT / LLaVA-OneVision reference models (transformers) and anyres inputs."""
from __future__ import annotations

import numpy as np
import torch
from transformers import (CLIPVisionConfig, LlamaConfig, LlavaNextConfig,
                          LlavaNextForConditionalGeneration, LlavaOnevisionConfig,
                          LlavaOnevisionForConditionalGeneration, Qwen2Config, SiglipVisionConfig)

from tests.helpers.hf_tiny import IMAGE_TOKEN, INIT, _llm_kwargs

CROP = 28
NEXT_PINPOINTS = [[28, 56], [56, 28], [56, 56], [84, 28], [28, 84]]
OV_PINPOINTS = [[28 * i, 28 * j] for i in range(1, 5) for j in range(1, 5)]


def _vision(cls, **kw):
  return cls(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
             image_size=CROP, patch_size=14, initializer_range=INIT, **kw)


def llava_next(**llm_kw) -> LlavaNextForConditionalGeneration:
  """CLIP tower, `default` features (CLS dropped), layer -2, Llama."""
  torch.manual_seed(5)
  cfg = LlavaNextConfig(vision_config=_vision(CLIPVisionConfig),
                        text_config=LlamaConfig(**_llm_kwargs(**llm_kw)),
                        image_token_index=IMAGE_TOKEN, image_grid_pinpoints=NEXT_PINPOINTS)
  return LlavaNextForConditionalGeneration(cfg).eval()


def llava_onevision(aspect: str = "anyres_max_1", **llm_kw) -> LlavaOnevisionForConditionalGeneration:
  """SigLIP tower (no head), `full` features, layer -1, Qwen2; `anyres_max_1` makes the
  bilinear downsampling run at these tiny sizes."""
  torch.manual_seed(6)
  cfg = LlavaOnevisionConfig(vision_config=_vision(SiglipVisionConfig, vision_use_head=False),
                             text_config=Qwen2Config(**_llm_kwargs(**llm_kw)),
                             image_token_index=IMAGE_TOKEN, video_token_index=98,
                             image_grid_pinpoints=OV_PINPOINTS, vision_aspect_ratio=aspect)
  return LlavaOnevisionForConditionalGeneration(cfg).eval()


def image_inputs(cfg, sizes_hw, batch_num_images=None, seed=0):
  """Random HF-layout `pixel_values` (N, max_crops, 3, S, S) (zero crop padding), `image_sizes`
  and the crops and token count of each image (from our own `models.anyres` rules)."""
  from mllm_tune.models import hf_inputs as hfi
  crops = hfi.anyres_crop_counts(cfg, np.asarray(sizes_hw), batch_num_images)
  tokens = [len(t) for t in hfi.image_tables(cfg, np.asarray(sizes_hw), crops)]
  rng = np.random.RandomState(seed)
  px = np.zeros((len(sizes_hw), max(crops), 3, CROP, CROP), np.float32)
  for i, n in enumerate(crops):
    px[i, :n] = rng.randn(n, 3, CROP, CROP)
  return px, np.asarray(sizes_hw, np.int64), crops, tokens


def hf_forward(model, ids, mask, px, sizes, batch_num_images=None):
  from tests.helpers.hf_tiny import positions
  kw = {}
  if batch_num_images is not None:
    kw["batch_num_images"] = torch.tensor(batch_num_images)
  with torch.no_grad():
    out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                position_ids=torch.tensor(positions(mask)), pixel_values=torch.tensor(px),
                image_sizes=torch.tensor(sizes), **kw)
  return out.logits.float().numpy()
