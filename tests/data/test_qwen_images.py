"""Qwen2-VL / 2.5-VL preprocessing and placeholder expansion equal transformers'
`Qwen2VLImageProcessorPil` and `Qwen2VLProcessor` (PIL backend; the processor's None video slot
is built as in tests/helpers (anyres_tiny.py, qwen_vl_tiny.py)), and the data pipeline's Qwen
samples: LLaVA JSON records through Qwen2-VL-Instruct's own (list-style) chat template give the
processor's ids, the assistant replies as targets and the template's generation prompts."""
from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_resize

from mllm_tune.data import qwen_images as qi
from mllm_tune.data.errors import DataError
from tests.helpers import qwen_vl_tiny as qt
from tests.helpers.data import image_bytes, write_llava_dataset

SIZES_WH = [(70, 40), (30, 30), (50, 90), (300, 200), (1000, 20), (13, 7), (112, 84),
            (40, 120), (29, 57)]


def _images() -> list[Image.Image]:
  rng = np.random.RandomState(0)
  out = [Image.fromarray(rng.randint(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in SIZES_WH]
  out.append(Image.fromarray(rng.randint(0, 256, (45, 61, 4), dtype=np.uint8), "RGBA"))
  out.append(Image.fromarray(rng.randint(0, 256, (33, 80), dtype=np.uint8), "L"))
  return out


@pytest.mark.parametrize("settings", [
    dict(min_pixels=qt.MIN_PIXELS, max_pixels=qt.MAX_PIXELS),   # the tiny models' budget
    dict(),                                                      # the class defaults
    dict(min_pixels=56 * 56, max_pixels=56 * 56 * 2, image_mean=[0.5] * 3,
         image_std=[0.5] * 3, merge_size=1, resample=2),
])
def test_pixels_and_grids_equal_image_processor(settings, tmp_path):
  hf = qt.image_processor(**settings) if settings else qt.image_processor(
      min_pixels=qi.DEFAULT_MIN_PIXELS, max_pixels=qi.DEFAULT_MAX_PIXELS)
  hf.save_pretrained(str(tmp_path))
  spec = qi.QwenImageSpec.from_pretrained(str(tmp_path))
  images = _images()
  ref = hf(images=images, return_tensors="np")
  ours = qi.preprocess_qwen(images, spec)
  np.testing.assert_array_equal(ours.image_grid_thw, ref["image_grid_thw"])
  assert ours.pixel_values.shape == ref["pixel_values"].shape
  np.testing.assert_allclose(ours.pixel_values, ref["pixel_values"], atol=1e-5, rtol=0)
  counts = [spec.image_tokens((im.height, im.width)) for im in images]
  assert counts == [int(np.prod(g)) // spec.merge_unit for g in ref["image_grid_thw"]]
  assert len(set(counts)) >= 4  # sizes and aspect ratios give different grids


def test_smart_resize_equals_transformers():
  rng = np.random.RandomState(1)
  sizes = [(1, 1), (27, 29), (28, 28), (10, 2000), (4000, 3000)] + [
      tuple(rng.randint(1, 3000, 2)) for _ in range(200)]
  for factor, lo, hi in ((28, 784, 18816), (28, 3136, 12845056), (32, 1024, 16384)):
    for h, w in sizes:
      if max(h, w) / min(h, w) > 200:
        continue
      assert qi.smart_resize(int(h), int(w), factor, lo, hi) == hf_resize(h, w, factor, lo, hi)


def test_spec_from_both_config_layouts_and_legacy_keys(tmp_path):
  proc = qt.processor(qt.qwen_tokenizer())
  qt.save_processor(proc, str(tmp_path / "v5"))  # processor_config.json: image_processor
  assert not os.path.exists(tmp_path / "v5" / "preprocessor_config.json")
  spec = qi.QwenImageSpec.from_pretrained(str(tmp_path / "v5"))
  assert (spec.min_pixels, spec.max_pixels) == (qt.MIN_PIXELS, qt.MAX_PIXELS)
  proc.image_processor.save_pretrained(str(tmp_path / "pre"))
  assert qi.QwenImageSpec.from_pretrained(str(tmp_path / "pre")) == spec
  # the hub's older file: top-level min_pixels / max_pixels (they win over `size`)
  legacy = {"min_pixels": 56 * 56, "max_pixels": 28 * 28 * 4, "patch_size": 14,
            "merge_size": 2, "temporal_patch_size": 2,
            "image_processor_type": "Qwen2VLImageProcessor",
            "size": {"shortest_edge": 1, "longest_edge": 10 ** 7}}
  ref = qt.image_processor(**{k: v for k, v in legacy.items() if k != "image_processor_type"})
  images = _images()[:4]
  spec = qi.QwenImageSpec.from_hf(legacy)
  assert (spec.min_pixels, spec.max_pixels) == (56 * 56, 28 * 28 * 4)
  np.testing.assert_array_equal(qi.preprocess_qwen(images, spec).image_grid_thw,
                                ref(images=images, return_tensors="np")["image_grid_thw"])
  # overrides (data.min_pixels / data.max_pixels) equal a processor built with them
  spec = qi.QwenImageSpec.from_pretrained(str(tmp_path / "v5"), min_pixels=28 * 28 * 8,
                                          max_pixels=28 * 28 * 8)
  ref = qt.image_processor(min_pixels=28 * 28 * 8, max_pixels=28 * 28 * 8)
  np.testing.assert_array_equal(qi.preprocess_qwen(images, spec).image_grid_thw,
                                ref(images=images, return_tensors="np")["image_grid_thw"])


def test_config_errors_name_the_file_and_field(tmp_path):
  path = tmp_path / "preprocessor_config.json"
  path.write_text(json.dumps({"image_processor_type": "CLIPImageProcessor"}))
  with pytest.raises(ValueError, match=r"preprocessor_config\.json: image_processor_type "
                                       r"'CLIPImageProcessor' is not a Qwen2-VL"):
    qi.QwenImageSpec.from_pretrained(str(tmp_path))
  path.write_text(json.dumps({"size": {"longest_edge": 100}}))
  with pytest.raises(ValueError, match=r"preprocessor_config\.json: size .* needs "
                                       "'shortest_edge'"):
    qi.QwenImageSpec.from_pretrained(str(tmp_path))
  path.write_text(json.dumps({"min_pixels": 1000, "max_pixels": 10}))
  with pytest.raises(ValueError, match=r"preprocessor_config\.json: min_pixels 1000 > "
                                       "max_pixels 10"):
    qi.QwenImageSpec.from_pretrained(str(tmp_path))
  path.write_text("{")
  with pytest.raises(ValueError, match=r"preprocessor_config\.json:1:2: malformed JSON"):
    qi.QwenImageSpec.from_pretrained(str(tmp_path))
  os.remove(path)
  (tmp_path / "processor_config.json").write_text(json.dumps({"processor_class": "X"}))
  with pytest.raises(ValueError, match=r"processor_config\.json: no 'image_processor'"):
    qi.QwenImageSpec.from_pretrained(str(tmp_path))


def test_bad_images_raise_data_errors_naming_the_image():
  spec = qi.QwenImageSpec(min_pixels=qt.MIN_PIXELS, max_pixels=qt.MAX_PIXELS)
  with pytest.raises(DataError, match=r"rec 3: image a\.png: a 1000x4 \(WxH\) image has an "
                                      "aspect ratio of 250"):
    spec.grid((4, 1000), "rec 3: image a.png")
  refuse = qi.QwenImageSpec(min_pixels=qt.MIN_PIXELS, max_pixels=qt.MAX_PIXELS,
                            out_of_budget="refuse")
  assert refuse.grid((28, 28)) == (2, 2) and refuse.grid((84, 224)) == (6, 16)
  for hw, side in (((20, 30), "below"), ((200, 100), "above")):
    with pytest.raises(DataError, match=r"rec 3: image b\.png: a \d+x\d+ \(WxH\) image has \d+ "
                                        r"pixels, outside the budget \[min_pixels=784, "
                                        r"max_pixels=18816\]") as e:
      refuse.grid(hw, "rec 3: image b.png")
    assert e.value.reason == "image_budget", side
  assert spec.grid((20, 30)) == (2, 2) and spec.grid((200, 100)) == (12, 6)  # resized instead
  fixed = qi.QwenImageSpec(do_resize=False)
  assert fixed.grid((56, 84)) == (4, 6)
  with pytest.raises(DataError, match=r"rec 1: image c\.png: a 70x56 \(WxH\) image "
                                      r"\(do_resize=False\) is not a multiple of patch_size \* "
                                      r"merge_size = 28.*4x5 is not made of whole 2x2 merge"):
    fixed.grid((56, 70), "rec 1: image c.png")
  capped = qi.QwenImageSpec(min_pixels=qt.MIN_PIXELS, max_pixels=qt.MAX_PIXELS,
                            max_image_tokens=6)
  assert capped.image_tokens((56, 84)) == 6
  with pytest.raises(DataError, match=r"yields 12 image tokens \(grid 6x8 patches\), more than "
                                      "max_image_tokens=6"):
    capped.grid((84, 112))
  with pytest.raises(ValueError, match="out_of_budget='crop'"):
    qi.QwenImageSpec(out_of_budget="crop")


# ----------------------------------------------------------------------------- samples
@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
  """A tiny Qwen2.5-VL directory (model, tokenizer with Qwen's template, processor) and our
  preparer for it."""
  import mllm_tune as mt
  from mllm_tune.data.pipeline import SamplePreparer
  d, hf_model, proc = qt.model_dir(str(tmp_path_factory.mktemp("qwen")))
  model, _ = mt.load_pretrained(d)
  return d, hf_model, proc, model, SamplePreparer.from_pretrained(d, model.config, 400)


CONVERSATIONS = [  # (LLaVA turns, images (W, H))
    ([{"from": "human", "value": "<image>\nwhat is this"},
      {"from": "gpt", "value": "a red cat"}], [(70, 40)]),
    ([{"from": "human", "value": "compare <image> and <image>."},
      {"from": "gpt", "value": "two dogs"}, {"from": "human", "value": "and <image>?"},
      {"from": "gpt", "value": "blue"}], [(50, 90), (112, 84), (84, 56)]),
    ([{"from": "system", "value": "Be brief."}, {"from": "human", "value": "hi <image>"},
      {"from": "gpt", "value": "a square"}], [(1000, 20)]),
    ([{"from": "human", "value": "tell me a joke"}, {"from": "gpt", "value": "7 8 9"}], []),
]


@pytest.mark.parametrize("case", range(len(CONVERSATIONS)))
def test_token_ids_patches_and_positions_equal_the_processor(qwen, case):
  """Each `<image>` of a LLaVA record becomes the checkpoint's <|vision_start|><|image_pad|>
  <|vision_end|>, the pad repeated gh*gw/4 times: the ids of the HF processor on the same
  conversation with structured image content; our patches and M-RoPE ids are its pixel values
  and `get_rope_index`."""
  import torch
  _, hf_model, proc, model, prepare = qwen
  turns, sizes = CONVERSATIONS[case]
  data = [image_bytes(w, h, seed=i) for i, (w, h) in enumerate(sizes)]
  sample = prepare({"conversations": turns, "images": data, "id": str(case), "where": "rec"})
  text = proc.apply_chat_template(qt.hf_messages(turns), tokenize=False)
  imgs = [Image.open(io.BytesIO(b)) for b in data]
  enc = proc(images=imgs or None, text=[text], return_tensors="pt")
  ids = sample.tokens.input_ids
  np.testing.assert_array_equal(ids, enc["input_ids"][0].numpy())
  image_id = model.config.image_token_id
  if imgs:
    np.testing.assert_array_equal(sample.grids, enc["image_grid_thw"].numpy())
    rows = qi.patch_rows(sample.pixels, prepare.qwen_spec)
    np.testing.assert_allclose(rows, enc["pixel_values"].numpy(), atol=1e-5, rtol=0)
  ref_pos, _ = hf_model.model.get_rope_index(
      enc["input_ids"], enc["mm_token_type_ids"], enc.get("image_grid_thw"),
      attention_mask=enc["attention_mask"])
  np.testing.assert_array_equal(sample.mrope_positions, ref_pos[:, 0].numpy())
  # targets: the assistant replies and their <|im_end|>, never image or prompt tokens
  tok = proc.tokenizer
  target_text = tok.decode(ids[sample.tokens.loss_mask.astype(bool)])
  replies = [t["value"] for t in turns if t["from"] == "gpt"]
  assert target_text == "".join(r + "<|im_end|>" for r in replies)
  assert not (sample.tokens.loss_mask.astype(bool) & (ids == image_id)).any()


def test_placeholder_and_image_mismatches_name_the_record(qwen):
  _, _, _, _, prepare = qwen
  one = [image_bytes(70, 40)]
  turns = [{"from": "human", "value": "<image> and <image>"}, {"from": "gpt", "value": "a"}]
  with pytest.raises(DataError, match=r"rec 7: 2 <image> placeholder\(s\) in the conversation "
                                      r"but 1 image\(s\)"):
    prepare({"conversations": turns, "images": one, "where": "rec 7"})
  turns = [{"from": "human", "value": "<image> <|image_pad|>"}, {"from": "gpt", "value": "a"}]
  with pytest.raises(DataError, match=r"rec 8: conversations\[0\]\.value holds the image token "
                                      r"'<\|image_pad\|>' as text; mark images with <image>"):
    prepare({"conversations": turns, "images": one, "where": "rec 8"})
  turns = [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "a"}]
  with pytest.raises(DataError, match=r"rec 9: image #0: a 1000x4 \(WxH\) image has an aspect"):
    prepare({"conversations": turns, "images": [image_bytes(1000, 4)], "where": "rec 9"})


def test_truncation_keeps_whole_images_and_their_positions(qwen):
  from mllm_tune.data.pipeline import SamplePreparer
  prepare = qwen[-1]
  turns, sizes = CONVERSATIONS[1]
  data = [image_bytes(w, h, seed=i) for i, (w, h) in enumerate(sizes)]
  full = prepare({"conversations": turns, "images": data, "where": "rec"})
  starts = full.tokens.image_starts
  cut = SamplePreparer(prepare.chat, None, int(starts[2]) + 3, qwen_spec=prepare.qwen_spec)
  s = cut({"conversations": turns, "images": data, "where": "rec"})  # cut inside image 3
  assert s.truncated_from == len(full.tokens) and len(s.tokens) == int(starts[2])
  assert len(s.grids) == 2 and s.pixels.shape[0] == int(np.prod(s.grids, -1).sum())
  np.testing.assert_array_equal(s.mrope_positions, full.mrope_positions[:, :len(s.tokens)])


# ----------------------------------------------------------------------------- chat template
JSON_RECORDS = [  # LLaVA records: one image; two images over two turns; text only with system
    ({"id": "one", "conversations": [
        {"from": "human", "value": "<image>\nWhat is in the picture?"},
        {"from": "gpt", "value": "A red cat."}]}, [(70, 40)]),
    ({"id": "two", "conversations": [
        {"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "A dog."},
        {"from": "human", "value": "And this one? <image>"},
        {"from": "gpt", "value": "A blue square, smaller."}]}, [(50, 90), (112, 84)]),
    ({"id": "text", "conversations": [
        {"from": "system", "value": "Be brief."}, {"from": "human", "value": "Tell me a joke."},
        {"from": "gpt", "value": "7 8 9."}, {"from": "human", "value": "Another?"},
        {"from": "gpt", "value": "No."}]}, []),
]


def _hf_encode(proc, turns, images, generation_prompt=False):
  """transformers: Qwen2VLProcessor(images, text=the tokenizer's template on list-style
  messages)."""
  text = proc.tokenizer.apply_chat_template(qt.hf_messages(turns), tokenize=False,
                                            add_generation_prompt=generation_prompt)
  enc = proc(images=images or None, text=[text], return_tensors="np")
  return enc["input_ids"][0], text


def _answer_mask(tok, ids):
  """Independent of mllm_tune: 1 from after each `<|im_start|>assistant\\n` through the next
  `<|im_end|>`."""
  head = tok.encode("<|im_start|>assistant\n", add_special_tokens=False)
  end = tok.convert_tokens_to_ids("<|im_end|>")
  mask = np.zeros(len(ids), np.int32)
  for p in range(len(ids) - len(head)):
    if list(ids[p:p + len(head)]) == head:
      start = p + len(head)
      stop = start + list(ids[start:]).index(end)
      mask[start:stop + 1] = 1
  return mask


def test_llava_json_through_qwens_list_template_equals_the_processor(qwen, tmp_path):
  """Qwen2-VL-Instruct's hub template renders list-style contents (an image item as
  <|vision_start|><|image_pad|><|vision_end|>), so LLaVA records take that path: ids (image pads
  expanded) equal the processor's on the template's own rendering of list-style messages, the
  default system prompt included; targets are exactly the assistant replies + <|im_end|>; the
  generation prompt is the template's with add_generation_prompt=True."""
  from mllm_tune.data.sources import LlavaJsonSource
  _, _, proc, _, prepare = qwen
  assert prepare.chat.content_style == "list"
  records, files = [], {}
  for rec, sizes in JSON_RECORDS:
    names = [f"{rec['id']}{k}.png" for k in range(len(sizes))]
    files.update({n: image_bytes(w, h, seed=k) for k, (n, (w, h)) in enumerate(zip(names, sizes))})
    records.append({**rec, "image": names if len(names) > 1 else names[0]} if names else rec)
  root = str(tmp_path / "data")
  source = LlavaJsonSource(write_llava_dataset(root, records, files), f"{root}/images")
  tok = proc.tokenizer
  for i in range(len(records)):
    rec = source[i]
    imgs = [Image.open(io.BytesIO(b)) for b in rec["images"]]
    sample = prepare(rec)
    ref_ids, text = _hf_encode(proc, rec["conversations"], imgs)
    assert ("Be brief." in text) != ("You are a helpful assistant." in text)
    np.testing.assert_array_equal(sample.tokens.input_ids, ref_ids)
    np.testing.assert_array_equal(sample.tokens.loss_mask, _answer_mask(tok, ref_ids))
    replies = [t["value"] for t in rec["conversations"] if t["from"] == "gpt"]
    assert tok.decode(ref_ids[_answer_mask(tok, ref_ids).astype(bool)]) == "".join(
        r + "<|im_end|>" for r in replies)
    head = rec["conversations"][:-1]
    ref_prompt, _ = _hf_encode(proc, head, imgs, generation_prompt=True)
    np.testing.assert_array_equal(prepare.prompt_ids(rec, sample), ref_prompt)
    assert len(ref_prompt) < len(ref_ids) and list(ref_prompt[-3:]) == tok.encode(
        "<|im_start|>assistant\n", add_special_tokens=False)[-3:]


def test_a_string_only_template_gets_the_image_text_inline(qwen):
  """`data.template=chatml` (string contents only): each `<image>` becomes the checkpoint's
  image text in place; ids and the generation prompt equal the processor on that rendering."""
  from mllm_tune.data.conversation import CHATML, ChatTokenizer
  _, _, proc, model, prepare = qwen
  c = prepare.chat
  chat = ChatTokenizer(c.tokenizer, c.image_token_id, 1, "chatml", image_text=c.image_text)
  assert chat.content_style == "string"
  rec, sizes = JSON_RECORDS[1]
  imgs = [Image.open(io.BytesIO(image_bytes(w, h, seed=k))) for k, (w, h) in enumerate(sizes)]
  counts = [int(g[1] * g[2]) // 4 for g in proc.image_processor(images=imgs)["image_grid_thw"]]
  turns = rec["conversations"]
  for head, gen in ((turns, False), (turns[:-1], True)):
    msgs = [{"role": {"human": "user", "gpt": "assistant"}[t["from"]],
             "content": t["value"].replace("<image>", c.image_text)} for t in head]
    text = proc.tokenizer.apply_chat_template(msgs, chat_template=CHATML, tokenize=False,
                                              add_generation_prompt=gen)
    ref = proc(images=imgs, text=[text], return_tensors="np")["input_ids"][0]
    ours = (chat.encode_prompt(turns, 2, image_tokens=counts) if gen
            else chat.encode(turns, 2, image_tokens=counts).input_ids)
    np.testing.assert_array_equal(ours, ref)
