"""Tiny random Hugging Face reference models, built from configs and saved by the tests."""
from __future__ import annotations

import numpy as np
import torch
from transformers import (CLIPVisionConfig, LlamaConfig, LlamaForCausalLM, LlavaConfig,
                          LlavaForConditionalGeneration, MistralConfig, MistralForCausalLM,
                          Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig)

IMAGE_TOKEN = 99
VOCAB = 100
INIT = 0.1  # larger than HF's 0.02 so greedy argmax margins are not razor-thin


def _llm_kwargs(**kw):
  base = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              initializer_range=INIT, pad_token_id=0, bos_token_id=1, eos_token_id=2)
  base.update(kw)
  return base


def clip_llama(**llm_kw) -> LlavaForConditionalGeneration:
  torch.manual_seed(0)
  vc = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                        num_attention_heads=4, image_size=28, patch_size=14,
                        initializer_range=INIT)
  tc = LlamaConfig(**_llm_kwargs(**llm_kw))
  cfg = LlavaConfig(vision_config=vc, text_config=tc, image_token_index=IMAGE_TOKEN)
  return LlavaForConditionalGeneration(cfg).eval()


def siglip_qwen2() -> LlavaForConditionalGeneration:
  """SigLIP tower (with its pooling head) + Qwen2 (qkv bias, tied embeddings), 'full' features."""
  torch.manual_seed(1)
  vc = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                          num_attention_heads=4, image_size=28, patch_size=14)
  tc = Qwen2Config(**_llm_kwargs(tie_word_embeddings=True))
  cfg = LlavaConfig(vision_config=vc, text_config=tc, image_token_index=IMAGE_TOKEN,
                    vision_feature_select_strategy="full", vision_feature_layer=-1,
                    tie_word_embeddings=True)
  return LlavaForConditionalGeneration(cfg).eval()


def llama(**kw) -> LlamaForCausalLM:
  torch.manual_seed(2)
  return LlamaForCausalLM(LlamaConfig(**_llm_kwargs(**kw))).eval()


def qwen2(**kw) -> Qwen2ForCausalLM:
  torch.manual_seed(3)
  return Qwen2ForCausalLM(Qwen2Config(**_llm_kwargs(**kw))).eval()


def mistral(**kw) -> MistralForCausalLM:
  torch.manual_seed(4)
  return MistralForCausalLM(MistralConfig(**_llm_kwargs(**kw))).eval()


def image_tokens(per_image: int, n: int) -> list[int]:
  return [IMAGE_TOKEN] * (per_image * n)


def padded_batch(rows: list[list[int]], side: str | list[str] = "right"):
  """Pad token rows to one length with id 0; `side` per row or for all."""
  sides = [side] * len(rows) if isinstance(side, str) else side
  t = max(map(len, rows))
  ids = np.zeros((len(rows), t), np.int64)
  mask = np.zeros((len(rows), t), np.int64)
  for b, (row, s) in enumerate(zip(rows, sides)):
    sl = slice(0, len(row)) if s == "right" else slice(t - len(row), t)
    ids[b, sl], mask[b, sl] = row, 1
  return ids, mask


def positions(mask: np.ndarray) -> np.ndarray:
  """Padding-invariant positions, the convention of mllm_tune and HF generate."""
  return np.maximum(np.cumsum(mask, -1) - 1, 0)


def hf_logits(model, ids, mask, px_NHWC=None) -> np.ndarray:
  kw = {}
  if px_NHWC is not None:
    kw["pixel_values"] = torch.tensor(np.ascontiguousarray(px_NHWC.transpose(0, 3, 1, 2)))
  with torch.no_grad():
    out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                position_ids=torch.tensor(positions(mask)), **kw)
  return out.logits.float().numpy()


def hf_generate(model, ids, mask, px_NHWC=None, max_new_tokens=20, eos_token_id=None):
  kw = {}
  if px_NHWC is not None:
    kw["pixel_values"] = torch.tensor(np.ascontiguousarray(px_NHWC.transpose(0, 3, 1, 2)))
  with torch.no_grad():
    out = model.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                         max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                         eos_token_id=eos_token_id, pad_token_id=0, **kw)
  return out[:, ids.shape[1]:].numpy()
