"""Shared helpers of the data tests (no tests here): local tokenizers, images, LLaVA records.

No hub is reachable, so tokenizers are trained in-process with the `tokenizers` library: a
byte-level BPE with ChatML specials (Qwen2-like) and a Metaspace BPE with <s> </s> (Llama-like).
Both know `<image>` as a special token, as llava-hf tokenizers do.
"""
from __future__ import annotations

import io
import json
import os

import numpy as np
from PIL import Image

CORPUS = [
    "A chat between a curious human and an artificial intelligence assistant.",
    "The assistant gives helpful, detailed, and polite answers to the human's questions.",
    "USER: What is in the image? ASSISTANT: A cat sitting on a red mat.",
    "Describe the picture in detail. There are two dogs playing in the park near a tree.",
    "What color is the car? It is blue. How many people are there? Three people.",
    "You are a helpful assistant. system user assistant [INST] [/INST]",
    "Compare both images. The first shows a beach, the second a snowy mountain.",
    "Tell me a joke about numbers: 0123456789! Why? Because 7 8 9. Sure, here you go.",
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ .,:;!?'\"()-_/#%&*+=<>[]{}|@$^~`",
] * 5

# ChatML (Qwen2) with {% generation %} blocks: the reference for transformers' assistant mask.
CHATML_GEN = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}{% generation %}"
    "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
# LLaVA-1.5 vicuna_v1 with {% generation %} blocks.
VICUNA_GEN = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + ' ' }}"
    "{% set loop_messages = messages[1:] %}{% else %}{{ 'A chat between a curious human and an "
    "artificial intelligence assistant. The assistant gives helpful, detailed, and polite "
    "answers to the human\\'s questions. ' }}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}{% if message['role'] == 'user' %}"
    "{{ 'USER: ' + message['content'] + ' ' }}{% elif message['role'] == 'assistant' %}"
    "{{ 'ASSISTANT: ' }}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")
# A Llama-2 style template (content stripped, a space before </s>), as a tokenizer's own.
LLAMA2 = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'].strip() + ' [/INST]' }}{% elif message['role'] == "
    "'assistant' %}{{ ' ' + message['content'].strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}")
LLAMA2_GEN = LLAMA2.replace(
    "{{ ' ' + message['content'].strip() + ' ' + eos_token }}",
    "{{ ' ' }}{% generation %}{{ message['content'].strip() + ' ' + eos_token }}"
    "{% endgeneration %}")

# llava-hf/llava-1.5-7b-hf's chat template, verbatim (generation tags, no end token).
LLAVA15_HF = (
    "{% for message in messages %}{% if message['role'] != 'system' %}"
    "{{ message['role'].upper() + ': '}}{% endif %}{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{# Render all text next #}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")


def chatml_tokenizer(chat_template: str | None = None):
  """Byte-level BPE (Qwen2-like): <|endoftext|>=0 <|im_start|>=1 <|im_end|>=2 <image>=3."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  from transformers import PreTrainedTokenizerFast
  tk = Tokenizer(models.BPE())
  tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tk.decoder = decoders.ByteLevel()
  tk.train_from_iterator(CORPUS, trainers.BpeTrainer(
      vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
  tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>",
                                pad_token="<|endoftext|>")
  tok.chat_template = chat_template
  return tok


def llama_tokenizer(chat_template: str | None = None):
  """Metaspace BPE (Llama-like): <unk>=0 <s>=1 </s>=2 <image>=3."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  from transformers import PreTrainedTokenizerFast
  tk = Tokenizer(models.BPE(unk_token="<unk>"))
  tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
  tk.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
  tk.train_from_iterator(CORPUS, trainers.BpeTrainer(
      vocab_size=320, special_tokens=["<unk>", "<s>", "</s>", "<image>"], show_progress=False))
  tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>",
                                unk_token="<unk>", pad_token="<unk>")
  tok.chat_template = chat_template
  return tok


def hf_reference(tok, gen_template: str, turns: list[dict], image_seq_len: int):
  """transformers' ids and assistant mask, `<image>` expanded in the text (LlavaProcessor's way)."""
  from mllm_tune.data.conversation import to_messages
  messages = [{"role": m["role"], "content": m["content"].replace("<image>",
                                                                  "<image>" * image_seq_len)}
              for m in to_messages(turns)]
  out = tok.apply_chat_template(messages, chat_template=gen_template, tokenize=True,
                                return_dict=True, return_assistant_tokens_mask=True)
  return np.asarray(out["input_ids"]), np.asarray(out["assistant_masks"])


def image_bytes(w: int, h: int, seed: int = 0, mode: str = "RGB", fmt: str = "PNG") -> bytes:
  rng = np.random.RandomState(seed)
  channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
  arr = rng.randint(0, 256, (h, w, channels), dtype=np.uint8)
  img = Image.fromarray(arr[..., 0] if channels == 1 else arr, mode)
  buf = io.BytesIO()
  img.save(buf, format=fmt)
  return buf.getvalue()


def turns(*pairs: str, system: str | None = None) -> list[dict]:
  """LLaVA turns from alternating human / gpt strings."""
  out = [{"from": "system", "value": system}] if system else []
  return out + [{"from": "human" if i % 2 == 0 else "gpt", "value": v}
                for i, v in enumerate(pairs)]


def write_llava_dataset(root: str, records: list[dict], images: dict[str, bytes],
                        name: str = "data.json") -> str:
  """Write images under root/images and the records as JSON (or JSONL by suffix)."""
  os.makedirs(os.path.join(root, "images"), exist_ok=True)
  for rel, data in images.items():
    os.makedirs(os.path.dirname(os.path.join(root, "images", rel)), exist_ok=True)
    with open(os.path.join(root, "images", rel), "wb") as f:
      f.write(data)
  path = os.path.join(root, name)
  with open(path, "w") as f:
    if name.endswith(".jsonl"):
      f.write("".join(json.dumps(r) + "\n" for r in records))
    else:
      json.dump(records, f, indent=1)
  return path


def mixed_records(n: int, seed: int = 0) -> tuple[list[dict], dict[str, bytes]]:
  """n LLaVA records of varied length: one image, two images, or text only."""
  rng = np.random.RandomState(seed)
  words = "the cat sat on a red mat near two dogs playing in the park".split()
  records, images = [], {}
  for i in range(n):
    kind = i % 3
    say = lambda k: " ".join(rng.choice(words, k))
    n_turns = 1 + rng.randint(3)
    pairs = []
    for t in range(n_turns):
      pairs += [say(2 + rng.randint(12)), say(1 + rng.randint(20))]
    rec = {"id": f"s{i}"}
    if kind == 0:
      pairs[0] = "<image>\n" + pairs[0]
      rec["image"] = f"{i}.png"
      images[f"{i}.png"] = image_bytes(20 + i % 7, 16 + i % 5, seed=i)
    elif kind == 1:
      pairs[0] = "<image> and <image>\n" + pairs[0]
      rec["image"] = [f"{i}a.png", f"{i}b.png"]
      images[f"{i}a.png"] = image_bytes(30, 18, seed=i)
      images[f"{i}b.png"] = image_bytes(14, 25, seed=i + 1000)
    rec["conversations"] = turns(*pairs)
    records.append(rec)
  return records, images


SIZES_WH = [(70, 40), (30, 30), (50, 90), (100, 60), (112, 84), (40, 120)]


def sized_records(n: int = 8, seed: int | None = None) -> tuple[list[dict], dict[str, bytes]]:
  """n LLaVA records cycling one image, one image, two images, text only, with images of the six
  `SIZES_WH` sizes (the anyres / Qwen batches: token counts per image differ); answers of 2-5
  words, cycled through a word list (`seed=None`) or drawn with `RandomState(seed)`."""
  rng = None if seed is None else np.random.RandomState(seed)
  words = ["a", "cat", "dog", "blue", "red", "square"]
  records, images = [], {}
  for i in range(n):
    names = []
    for j in range((1, 1, 2, 0)[i % 4]):
      w, h = SIZES_WH[(i + j) % len(SIZES_WH)]
      names.append(f"im{i}_{j}.png")
      images[names[-1]] = image_bytes(w, h, seed=i * 7 + j)
    q = " ".join(["<image>"] * len(names) + ["what", "is", "this"][:1 + i % 3])
    a = " ".join(rng.choice(words, 2 + i % 4) if rng is not None
                 else [words[(i + k) % len(words)] for k in range(2 + i % 4)])
    rec = {"id": str(i), "conversations": [{"from": "human", "value": q},
                                           {"from": "gpt", "value": a}]}
    if names:
      rec["image"] = names[0] if len(names) == 1 else names
    records.append(rec)
  return records, images


def packed_cfg(json_path: str, image_folder: str, **kw) -> dict:
  """A `make_batches` data config: packed rows of 160 tokens, 3 a batch, in file order."""
  return {**dict(kind="llava_json", json_path=json_path, image_folder=image_folder, seq_len=160,
                 batch_size=3, packing=True, shuffle=False, prefetch=0, on_error="raise"), **kw}


def llava_model_dir(root: str, chat_template: str | None = None) -> str:
  """A tiny random CLIP + Llama LLaVA saved as an HF directory under root/model, with a ChatML
  tokenizer (vocabulary = the LLM's, `<image>` = the image token) and a 28 px CLIP processor."""
  import torch
  from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                            LlavaForConditionalGeneration)
  tok = chatml_tokenizer(chat_template)
  torch.manual_seed(0)
  vc = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, image_size=28, patch_size=14)
  tc = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   max_position_embeddings=256)
  image_id = tok.convert_tokens_to_ids("<image>")
  model = LlavaForConditionalGeneration(LlavaConfig(vision_config=vc, text_config=tc,
                                                    image_token_index=image_id))
  d = os.path.join(root, "model")
  model.save_pretrained(d)
  tok.save_pretrained(d)
  CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}
                     ).save_pretrained(d)
  return d
