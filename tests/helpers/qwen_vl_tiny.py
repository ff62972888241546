"""Tiny random Qwen2-VL / Qwen2.5-VL reference models (transformers) and image batches for them,
built from configs (random patch rows, grids and matching placeholder runs); a Qwen-like
tokenizer and chat template, the PIL image processor and processor, and checkpoint directories
with all of them saved by transformers."""
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


def qwen2_vl(tokens: dict = TOKENS, **llm_kw) -> Qwen2VLForConditionalGeneration:
  torch.manual_seed(7)
  cfg = Qwen2VLConfig(text_config=_text(**llm_kw), vision_config=dict(
      depth=2, embed_dim=32, hidden_size=32, num_heads=4, mlp_ratio=2, patch_size=14,
      spatial_merge_size=2, temporal_patch_size=2, initializer_range=INIT),
      tie_word_embeddings=llm_kw.get("tie_word_embeddings", False), **tokens)
  return Qwen2VLForConditionalGeneration(cfg).eval()


def qwen2_5_vl(fullatt=(1,), window_size=56, tokens: dict = TOKENS,
               **llm_kw) -> Qwen2_5_VLForConditionalGeneration:
  """3 blocks, full attention in `fullatt` only; windows of 56 px = 2 x 2 merged tokens, so the
  grids above are cut into partial windows."""
  torch.manual_seed(8)
  cfg = Qwen2_5_VLConfig(text_config=_text(**llm_kw), vision_config=dict(
      depth=3, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=32,
      patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=window_size,
      fullatt_block_indexes=list(fullatt), tokens_per_second=2, initializer_range=INIT),
      tie_word_embeddings=llm_kw.get("tie_word_embeddings", False), **tokens)
  return Qwen2_5_VLForConditionalGeneration(cfg).eval()


def image_run(grid) -> list[int]:
  t, h, w = grid
  return [VSTART] + [IMAGE] * (t * h * w // 4) + [VEND]


def batch(side="right", grids=GRIDS, seed=0, patch_dim=PATCH_DIM) -> dict:
  """Row 0: two images of different grids; row 1: one image; row 2: text only. Processor-like
  numpy output: input_ids, attention_mask, pixel_values (patches, patch_dim), image_grid_thw,
  mm_token_type_ids."""
  rows = [[1, 5] + image_run(grids[0]) + [7, 8] + image_run(grids[1]) + [9],
          [1, 3] + image_run(grids[2]) + [4, 6, 11, 12],
          [1, 20, 21, 22, 23]]
  ids, mask = padded_batch(rows, side)
  rng = np.random.RandomState(seed)
  n = sum(t * h * w for t, h, w in grids)
  return {"input_ids": ids, "attention_mask": mask,
          "pixel_values": rng.randn(n, patch_dim).astype(np.float32),
          "image_grid_thw": np.asarray(grids, np.int64),
          "mm_token_type_ids": (ids == IMAGE).astype(np.int64)}


def torch_inputs(enc: dict) -> dict:
  return {k: torch.tensor(v) for k, v in enc.items()}


def hf_logits(model, enc: dict) -> np.ndarray:
  with torch.no_grad():
    return model(**torch_inputs(enc)).logits.float().numpy()


# Qwen2-VL-Instruct's chat template (hub `chat_template.json`): structured content renders an
# image as <|vision_start|><|image_pad|><|vision_end|>; string content is written as it is.
QWEN_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture "
    "{{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video "
    "{{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                 "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
MIN_PIXELS, MAX_PIXELS = 28 * 28, 28 * 28 * 24  # tiny budgets: 1 to 24 merged tokens


def qwen_tokenizer(chat_template: str | None = QWEN_TEMPLATE):
  """Byte-level BPE trained here with Qwen2-VL's special tokens (ids 0..6 in QWEN_SPECIALS
  order); eos <|im_end|>, pad <|endoftext|>."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  from transformers import PreTrainedTokenizerFast
  from tests.helpers.data import CORPUS
  tk = Tokenizer(models.BPE())
  tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tk.decoder = decoders.ByteLevel()
  tk.train_from_iterator(CORPUS, trainers.BpeTrainer(
      vocab_size=320, special_tokens=QWEN_SPECIALS,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
  tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>",
                                pad_token="<|endoftext|>")
  tok.chat_template = chat_template
  return tok


def token_ids(tok) -> dict:
  """The config's special token ids, from the tokenizer."""
  get = tok.convert_tokens_to_ids
  return dict(image_token_id=get("<|image_pad|>"), video_token_id=get("<|video_pad|>"),
              vision_start_token_id=get("<|vision_start|>"),
              vision_end_token_id=get("<|vision_end|>"))


def image_processor(**kw):
  """`Qwen2VLImageProcessorPil` with the tiny pixel budgets (patch 14, merge 2)."""
  from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
      Qwen2VLImageProcessorPil)
  return Qwen2VLImageProcessorPil(**{"min_pixels": MIN_PIXELS, "max_pixels": MAX_PIXELS, **kw})


def processor(tok, **image_kw):
  """A `Qwen2VLProcessor` (PIL image processor; the video slot stays None, which the class's
  argument check refuses without torchvision, so the check skips None)."""
  from transformers import Qwen2VLProcessor
  from transformers.processing_utils import ProcessorMixin
  check = ProcessorMixin.check_argument_for_proper_class
  ProcessorMixin.check_argument_for_proper_class = (
      lambda self, name, arg: None if arg is None else check(self, name, arg))
  try:
    return Qwen2VLProcessor(image_processor(**image_kw), tok, None,
                            chat_template=tok.chat_template)
  finally:
    ProcessorMixin.check_argument_for_proper_class = check


def save_processor(proc, path: str) -> None:
  """transformers 5 `save_pretrained` without the None video slot (which the saver cannot
  handle)."""
  from transformers import Qwen2VLProcessor
  attrs = Qwen2VLProcessor.get_attributes
  Qwen2VLProcessor.get_attributes = classmethod(
      lambda cls: [a for a in attrs() if a != "video_processor"])
  try:
    proc.save_pretrained(path)
  finally:
    Qwen2VLProcessor.get_attributes = attrs


def model_dir(root: str, family: str = "qwen2_5_vl"):
  """A checkpoint directory as a user has it: the tiny model (vocabulary and special ids of the
  tokenizer), the tokenizer with Qwen's chat template and the processor, all saved by
  transformers. Returns (dir, hf_model, processor). Qwen3-VL gets Qwen2-VL's processor with
  16-pixel patches (for images Qwen3VLProcessor expands the same placeholders with the same
  image processor; its video processor needs torchvision)."""
  import os
  tok = qwen_tokenizer()
  kw = dict(vocab_size=len(tok), pad_token_id=0, bos_token_id=None, eos_token_id=2)
  image_kw = {}
  if family in ("qwen3_vl", "qwen3_vl_moe"):  # 16-pixel patches: the same merged-token budgets
    from tests.helpers import qwen3_vl_tiny
    build = getattr(qwen3_vl_tiny, family)
    image_kw = dict(patch_size=16, min_pixels=32 * 32, max_pixels=32 * 32 * 24)
  else:
    build = qwen2_5_vl if family == "qwen2_5_vl" else qwen2_vl
  hf = build(tokens=token_ids(tok), **kw)
  d = os.path.join(root, family)
  hf.save_pretrained(d)
  tok.save_pretrained(d)
  proc = processor(tok, **image_kw)
  save_processor(proc, d)
  return d, hf, proc


def hf_messages(conversations) -> list[dict]:
  """LLaVA turns -> the list-style messages transformers' processor takes, built as Qwen's own
  fine-tuning code builds them from LLaVA records: a user turn split at each `<image>` (and
  `<video>`) into {"type": "image"} ({"type": "video"}) items and its text pieces stripped
  (empty ones dropped); other turns one text item, verbatim. Written here, apart from
  mllm_tune, as the reference."""
  import re
  roles = {"human": "user", "gpt": "assistant", "system": "system"}
  out = []
  for turn in conversations:
    role, text = roles[turn["from"]], turn["value"]
    if role != "user":
      out.append({"role": role, "content": [{"type": "text", "text": text}]})
      continue
    content = []
    for piece in re.split(r"(<image>|<video>)", text):
      if piece in ("<image>", "<video>"):
        content.append({"type": piece[1:-1]})
      elif piece.strip():
        content.append({"type": "text", "text": piece.strip()})
    out.append({"role": role, "content": content})
  return out


def encode_record(proc):
  """`(LLaVA record, its PIL images) -> transformers' processor output` (torch): the record's
  turns as Qwen's chat template renders them (`hf_messages`), with its images."""
  def encode(rec, imgs):
    text = proc.apply_chat_template(hf_messages(rec["conversations"]), tokenize=False)
    return proc(images=imgs or None, text=[text], return_tensors="pt")
  return encode
