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


def _processor(family: str, tok):
  """A tiny transformers processor (PIL backend; the video slot of OneVision stays None)."""
  from transformers import LlavaNextProcessor, LlavaOnevisionProcessor
  from transformers.models.llava_next.image_processing_pil_llava_next import (
      LlavaNextImageProcessorPil)
  from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
      LlavaOnevisionImageProcessorPil)
  from transformers.processing_utils import ProcessorMixin
  check = ProcessorMixin.check_argument_for_proper_class
  ProcessorMixin.check_argument_for_proper_class = (
      lambda self, name, arg: None if arg is None else check(self, name, arg))
  try:
    if family == "llava_next":
      ip = LlavaNextImageProcessorPil(size={"shortest_edge": CROP},
                                      crop_size={"height": CROP, "width": CROP},
                                      image_grid_pinpoints=NEXT_PINPOINTS)
      return LlavaNextProcessor(ip, tok, patch_size=14, vision_feature_select_strategy="default",
                                num_additional_image_tokens=1)
    ip = LlavaOnevisionImageProcessorPil(size={"height": CROP, "width": CROP},
                                         image_grid_pinpoints=OV_PINPOINTS,
                                         image_mean=[0.5] * 3, image_std=[0.5] * 3)
    return LlavaOnevisionProcessor(ip, tok, None, num_image_tokens=4,
                                   vision_feature_select_strategy="full",
                                   vision_aspect_ratio="anyres_max_1")
  finally:
    ProcessorMixin.check_argument_for_proper_class = check


def save_processor(proc, path: str) -> None:
  """transformers 5 `save_pretrained` (OneVision without its None video slot, which the saver
  cannot handle)."""
  from transformers import LlavaOnevisionProcessor
  if isinstance(proc, LlavaOnevisionProcessor):
    attrs = LlavaOnevisionProcessor.get_attributes
    LlavaOnevisionProcessor.get_attributes = classmethod(
        lambda cls: [a for a in attrs() if a != "video_processor"])
    try:
      proc.save_pretrained(path)
    finally:
      LlavaOnevisionProcessor.get_attributes = attrs
  else:
    proc.save_pretrained(path)


def model_dir(root: str, family: str = "llava_onevision", template: str | None = None,
              video: bool = False):
  """A checkpoint directory as a user has it: model, tokenizer (chatml BPE trained here, its
  `<image>` id = the model's image token; with `video`, a `<video>` special token = the
  model's video token) and the processor, all saved by transformers.
  Returns (dir, hf_model, processor)."""
  import os
  from tokenizers import AddedToken
  from mllm_tune.data.conversation import CHATML
  from tests.helpers.data import chatml_tokenizer
  tok = chatml_tokenizer(template or CHATML)
  if video:
    tok.add_tokens([AddedToken("<video>", special=True, normalized=False)])
  image_id = tok.convert_tokens_to_ids("<image>")
  kw = dict(vocab_size=len(tok), pad_token_id=0, bos_token_id=None, eos_token_id=2)
  hf = llava_next(**kw) if family == "llava_next" else llava_onevision(**kw)
  hf.config.image_token_id = image_id
  if video:
    hf.config.video_token_id = tok.convert_tokens_to_ids("<video>")
  d = os.path.join(root, family)
  hf.save_pretrained(d)
  tok.save_pretrained(d)
  proc = _processor(family, tok)
  save_processor(proc, d)
  return d, hf, proc
