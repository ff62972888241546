"""Base-model assets built offline: a BPE tokenizer trained on the benchmark's own text, and an
HF-style model directory (weights, config, tokenizer, image processor) that the regular loading
code (`mt.load_pretrained`, `SamplePreparer.from_pretrained`) reads back.
"""
from __future__ import annotations

import os

from mllm_tune.data import offline_vqa as ov
from mllm_tune.data.conversation import CHATML
from mllm_tune.models.config import LLMConfig, LlavaConfig, VisionConfig

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>")
PAD_TOKEN, EOS_TOKEN, IMAGE_TOKEN = "<|endoftext|>", "<|im_end|>", "<image>"


def train_tokenizer(vocab_size: int = 512):
  """A byte-level BPE (ChatML specials, `<image>` special) trained on `offline_vqa.corpus()`.

  Deterministic for a given corpus and vocab size; returns a transformers fast tokenizer whose
  `chat_template` is ChatML (Qwen2-style), so the saved directory is self-contained."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  from transformers import PreTrainedTokenizerFast
  tk = Tokenizer(models.BPE())
  tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tk.decoder = decoders.ByteLevel()
  tk.train_from_iterator(ov.corpus(), trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
  tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN)
  tok.chat_template = CHATML
  return tok


def model_config(m, vocab_size: int, image_token_id: int) -> LlavaConfig:
  """The bench's `model` config section -> a tiny LLaVA config: `family` "llava" (CLIP-ViT +
  Llama, one image = one crop) or "llava_onevision" (SigLIP-ViT + Qwen2 with anyres tiling:
  crops of `crop_size`, pinpoints up to 2 x 2 crops, `vision_aspect_ratio`)."""
  family = m.get("family", "llava")
  if family not in ("llava", "llava_onevision"):
    raise ValueError(f"config key 'model.family': {family!r} must be 'llava' or "
                     "'llava_onevision'")
  ov_ = family == "llava_onevision"
  crop = m.get("crop_size") or m.image_size // 2 if ov_ else m.image_size
  v = VisionConfig(hidden_size=m.vision_hidden, intermediate_size=m.vision_mlp,
                   num_layers=m.vision_layers, num_heads=m.vision_heads,
                   image_size=crop, patch_size=m.patch_size,
                   **(dict(model_type="siglip_vision_model", hidden_act="gelu_pytorch_tanh",
                           layer_norm_eps=1e-6) if ov_ else {}))
  llm = LLMConfig(vocab_size=vocab_size, hidden_size=m.hidden, intermediate_size=m.mlp,
                  num_layers=m.layers, num_heads=m.heads, num_kv_heads=m.kv_heads,
                  head_dim=m.hidden // m.heads, max_position_embeddings=m.max_positions,
                  **(dict(model_type="qwen2", qkv_bias=True) if ov_ else {}))
  if not ov_:
    return LlavaConfig(vision=v, llm=llm, image_token_id=image_token_id,
                       vision_feature_layer=m.vision_feature_layer)
  return LlavaConfig(vision=v, llm=llm, image_token_id=image_token_id,
                     vision_feature_layer=m.vision_feature_layer,
                     vision_feature_select_strategy="full", model_type="llava_onevision",
                     image_grid_pinpoints=tuple((crop * i, crop * j) for i in (1, 2)
                                                for j in (1, 2)),
                     vision_aspect_ratio=m.get("vision_aspect_ratio") or "anyres_max_4")


def anyres_spec(cfg: LlavaConfig):
  """The OneVision image processor of a bench model (SigLIP normalization, no pad)."""
  from mllm_tune.data.anyres_images import AnyresImageSpec
  from mllm_tune.data.images import ImageSpec
  c = cfg.vision.image_size
  return AnyresImageSpec("llava_onevision", ImageSpec.siglip(c), c, (c, c),
                         cfg.image_grid_pinpoints, cfg.crop_side, cfg.vision_aspect_ratio)


def write_model_dir(path: str, model, params, tokenizer) -> None:
  """An HF LLaVA directory: safetensors + config.json, the tokenizer and a CLIP image processor
  for the tower's input size (so the data pipeline reads the same preprocessing back)."""
  from mllm_tune.checkpoints.hf import save_pretrained
  from transformers import CLIPImageProcessor
  cfg = model.config
  size = cfg.vision.image_size
  save_pretrained(path, model, params)
  tokenizer.save_pretrained(path)
  if not cfg.anyres:
    CLIPImageProcessor(size={"shortest_edge": size},
                       crop_size={"height": size, "width": size}).save_pretrained(path)
    return
  import json
  from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
      LlavaOnevisionImageProcessorPil)
  LlavaOnevisionImageProcessorPil(
      size={"height": size, "width": size}, image_mean=[0.5] * 3, image_std=[0.5] * 3,
      image_grid_pinpoints=[list(p) for p in cfg.image_grid_pinpoints]).save_pretrained(path)
  with open(os.path.join(path, "processor_config.json"), "w") as f:
    json.dump({"processor_class": "LlavaOnevisionProcessor",
               "num_image_tokens": cfg.crop_tokens, "vision_feature_select_strategy": "full",
               "vision_aspect_ratio": cfg.vision_aspect_ratio}, f, indent=1)


def image_token_id(tokenizer) -> int:
  return int(tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))


def exists(path: str) -> bool:
  return os.path.isfile(os.path.join(path, "config.json")) and os.path.isfile(
      os.path.join(path, "tokenizer.json"))
