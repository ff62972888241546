"""Base-model assets built offline: a BPE tokenizer trained on the benchmark's own text, and an
HF-style model directory (weights, config, tokenizer, image processor) that the regular loading
code (`mt.load_pretrained`, `SamplePreparer.from_pretrained`) reads back.
"""
from __future__ import annotations

import json
import os

from mllm_tune.data import offline_vqa as ov
from mllm_tune.data.conversation import CHATML
from mllm_tune.models.config import LLMConfig, LlavaConfig, RopeConfig, VisionConfig
from mllm_tune.models.qwen_vl_config import QwenVisionConfig, QwenVLConfig

FAMILIES = ("llava", "llava_onevision", "qwen2_5_vl")
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>")
# Qwen2-VL's own specials: an image is <|vision_start|><|image_pad|> * n <|vision_end|>
QWEN_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                       "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
PAD_TOKEN, EOS_TOKEN, IMAGE_TOKEN = "<|endoftext|>", "<|im_end|>", "<image>"
QWEN_IMAGE_TOKEN = "<|image_pad|>"


def family_of(m) -> str:
  """The `model.family` of a bench `model` config section, checked against `FAMILIES`."""
  family = m.get("family", "llava")
  if family not in FAMILIES:
    raise ValueError(f"config key 'model.family': {family!r} must be one of "
                     + ", ".join(repr(f) for f in FAMILIES))
  return family


def train_tokenizer(vocab_size: int = 512, family: str = "llava"):
  """A byte-level BPE (ChatML specials and `<image>`, or for Qwen families Qwen2-VL's specials)
  trained on `offline_vqa.corpus()`.

  Deterministic for a given corpus, vocab size and family; returns a transformers fast tokenizer
  whose `chat_template` is ChatML (Qwen2-style), so the saved directory is self-contained."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  from transformers import PreTrainedTokenizerFast
  tk = Tokenizer(models.BPE())
  tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tk.decoder = decoders.ByteLevel()
  tk.train_from_iterator(ov.corpus(), trainers.BpeTrainer(
      vocab_size=vocab_size,
      special_tokens=list(QWEN_SPECIAL_TOKENS if family == "qwen2_5_vl" else SPECIAL_TOKENS),
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
  tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN)
  tok.chat_template = CHATML
  return tok


def model_config(m, tokenizer) -> LlavaConfig | QwenVLConfig:
  """The bench's `model` config section -> a tiny model config (special token ids from
  `tokenizer`): `family` "llava" (CLIP-ViT + Llama, one image = one crop), "llava_onevision"
  (SigLIP-ViT + Qwen2 with anyres tiling: crops of `crop_size`, pinpoints up to 2 x 2 crops,
  `vision_aspect_ratio`) or "qwen2_5_vl" (`qwen_config`)."""
  family = family_of(m)
  if family == "qwen2_5_vl":
    return qwen_config(m, tokenizer)
  vocab_size, image_id = len(tokenizer), image_token_id(tokenizer)
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
    return LlavaConfig(vision=v, llm=llm, image_token_id=image_id,
                       vision_feature_layer=m.vision_feature_layer)
  return LlavaConfig(vision=v, llm=llm, image_token_id=image_id,
                     vision_feature_layer=m.vision_feature_layer,
                     vision_feature_select_strategy="full", model_type="llava_onevision",
                     image_grid_pinpoints=tuple((crop * i, crop * j) for i in (1, 2)
                                                for j in (1, 2)),
                     vision_aspect_ratio=m.get("vision_aspect_ratio") or "anyres_max_4")


def mrope_section(head_dim: int) -> tuple[int, int, int]:
  """Qwen2-VL's (16, 24, 24) split of head_dim / 2 = 64 frequencies, scaled: a quarter (t),
  the rest halved (h, w); e.g. head_dim 32 -> (4, 6, 6)."""
  half = head_dim // 2
  t = half // 4
  h = (half - t) // 2
  return t, h, half - t - h


def qwen_config(m, tokenizer) -> QwenVLConfig:
  """A tiny Qwen2.5-VL: the vision tower (patch `patch_size`, temporal patch 2, RMSNorm, gated
  SiLU MLP, 2D RoPE) with window attention of `window_size` px in every block but the last,
  which attends over the whole image (as Qwen2.5-VL's last block), the 2 x 2 PatchMerger to the
  LLM width, and a Qwen2 LLM (q/k/v biases) with M-RoPE (`mrope_section`). The vision widths,
  LLM sizes and theta (10000) are the other families'; config.json names the tokenizer's eos
  and pad ids (transformers' defaults are Qwen's 151k-vocabulary ids)."""
  get = tokenizer.convert_tokens_to_ids
  hidden = m.hidden
  v = QwenVisionConfig(model_type="qwen2_5_vl", hidden_size=m.vision_hidden,
                       intermediate_size=m.vision_mlp, out_hidden_size=hidden,
                       num_layers=m.vision_layers, num_heads=m.vision_heads,
                       patch_size=m.patch_size, temporal_patch_size=2, spatial_merge_size=2,
                       hidden_act="silu", window_size=m.get("window_size") or 16,
                       fullatt_block_indexes=(m.vision_layers - 1,))
  llm = LLMConfig(model_type="qwen2", vocab_size=len(tokenizer), hidden_size=hidden,
                  intermediate_size=m.mlp, num_layers=m.layers, num_heads=m.heads,
                  num_kv_heads=m.kv_heads, head_dim=hidden // m.heads, qkv_bias=True,
                  max_position_embeddings=m.max_positions,
                  rope=RopeConfig(mrope_section=mrope_section(hidden // m.heads)))
  text = {"bos_token_id": None, "eos_token_id": get(EOS_TOKEN), "pad_token_id": get(PAD_TOKEN)}
  return QwenVLConfig(vision=v, llm=llm, model_type="qwen2_5_vl",
                      hf_json=json.dumps({"text_config": text}),
                      image_token_id=get(QWEN_IMAGE_TOKEN), video_token_id=get("<|video_pad|>"),
                      vision_start_token_id=get("<|vision_start|>"),
                      vision_end_token_id=get("<|vision_end|>"))


def qwen_image_spec(cfg: QwenVLConfig, image_size: int):
  """The Qwen2-VL image processor of a bench model (CLIP normalization, bicubic): patch and
  merge sizes of the tower, temporal patch 2, and a pixel budget around the bench's square
  images, [(image_size / 2)^2, (2 * image_size)^2], so `smart_resize` only rounds their sides
  to multiples of patch * merge (32 px at patch 4: 8 x 8 patches, 16 image tokens)."""
  from mllm_tune.data.qwen_images import QwenImageSpec
  v = cfg.vision
  return QwenImageSpec(patch_size=v.patch_size, temporal_patch_size=v.temporal_patch_size,
                       merge_size=v.spatial_merge_size, min_pixels=(image_size // 2) ** 2,
                       max_pixels=(2 * image_size) ** 2)


def preparer(cfg, tokenizer, model_cfg, max_len: int, template: str):
  """The `SamplePreparer` of a base being built (the one `SamplePreparer.from_pretrained` reads
  back from its directory): CLIP crops (llava), anyres crops (OneVision) or Qwen2-VL patches
  with `<|vision_start|><|image_pad|>*n<|vision_end|>` and M-RoPE positions (qwen2_5_vl)."""
  from mllm_tune.data.conversation import ChatTokenizer
  from mllm_tune.data.images import ImageSpec
  from mllm_tune.data.pipeline import SamplePreparer, qwen_image_text
  if isinstance(model_cfg, QwenVLConfig):
    chat = ChatTokenizer(tokenizer, model_cfg.image_token_id, 1, template,
                         image_text=qwen_image_text(tokenizer, model_cfg))
    return SamplePreparer(chat, None, max_len, qwen_spec=qwen_image_spec(
        model_cfg, cfg.image_size), window_merge=model_cfg.vision.window_merge)
  chat = ChatTokenizer(tokenizer, model_cfg.image_token_id, model_cfg.crop_tokens, template)
  if model_cfg.anyres:
    return SamplePreparer(chat, None, max_len, anyres_spec=anyres_spec(model_cfg))
  return SamplePreparer(chat, ImageSpec.clip(cfg.image_size), max_len)


def anyres_spec(cfg: LlavaConfig):
  """The OneVision image processor of a bench model (SigLIP normalization, no pad)."""
  from mllm_tune.data.anyres_images import AnyresImageSpec
  from mllm_tune.data.images import ImageSpec
  c = cfg.vision.image_size
  return AnyresImageSpec("llava_onevision", ImageSpec.siglip(c), c, (c, c),
                         cfg.image_grid_pinpoints, cfg.crop_side, cfg.vision_aspect_ratio)


def write_model_dir(path: str, model, params, tokenizer, image_size: int = 0) -> None:
  """An HF model directory: safetensors + config.json, the tokenizer and the image processor
  (CLIP for the tower's input size, OneVision's, or Qwen2-VL's of `qwen_image_spec`), so the
  data pipeline reads the same preprocessing back."""
  from mllm_tune.checkpoints.hf import save_pretrained
  from transformers import CLIPImageProcessor
  cfg = model.config
  save_pretrained(path, model, params)
  tokenizer.save_pretrained(path)
  if isinstance(cfg, QwenVLConfig):
    _write_qwen_processor(path, cfg, image_size)
    return
  size = cfg.vision.image_size
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


def _write_qwen_processor(path: str, cfg: QwenVLConfig, image_size: int) -> None:
  from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
      Qwen2VLImageProcessorPil)
  s = qwen_image_spec(cfg, image_size)
  Qwen2VLImageProcessorPil(patch_size=s.patch_size, temporal_patch_size=s.temporal_patch_size,
                           merge_size=s.merge_size, min_pixels=s.min_pixels,
                           max_pixels=s.max_pixels).save_pretrained(path)


def image_token_id(tokenizer) -> int:
  return int(tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))


def exists(path: str) -> bool:
  return os.path.isfile(os.path.join(path, "config.json")) and os.path.isfile(
      os.path.join(path, "tokenizer.json"))
