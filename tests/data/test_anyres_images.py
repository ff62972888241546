"""Anyres preprocessing and token expansion equal transformers' LLaVA-NeXT / OneVision processors.

Tiny processors built like those of tests/helpers/anyres_tiny.py (PIL backend; the processors with a video
slot are built with `check_argument_for_proper_class` skipping None arguments, in-process).
"""
from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest
from PIL import Image
from transformers import LlavaNextProcessor, LlavaOnevisionProcessor
from transformers.models.llava_next.image_processing_pil_llava_next import (
    LlavaNextImageProcessorPil)
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
    LlavaOnevisionImageProcessorPil)
from transformers.processing_utils import ProcessorMixin

from mllm_tune.data.anyres_images import (AnyresImageSpec, anyres_crops, anyres_flags,
                                          preprocess_anyres)
from mllm_tune.data.conversation import ChatTokenizer
from mllm_tune.data.errors import DataError
from mllm_tune.models import anyres as geom

NEXT_PINPOINTS = [[28, 56], [56, 28], [56, 56], [84, 28], [28, 84]]
OV_PINPOINTS = [[28 * i, 28 * j] for i in range(1, 5) for j in range(1, 5)]
SIZES_WH = [(70, 40), (30, 30), (50, 90), (100, 60), (112, 84)]
WORDS = ["user", "assistant", ":", "describe", "the", "image", "compare", "and", "a", "cat",
         "dog", "."]
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<image>", "<video>"]
IMAGE_ID = SPECIALS.index("<image>")
# role-prefixed turns, `</s>` after each reply (the loss mask's end-of-turn token)
TEMPLATE = ("{% for m in messages %}{{ m['role'] + ' : ' + m['content'] + ' ' }}"
            "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}")


def _tokenizer():
  from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast
  vocab = {w: i for i, w in enumerate(SPECIALS + WORDS)}
  tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tk.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
  return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>",
                                 eos_token="</s>", pad_token="<pad>")


def _images() -> list[Image.Image]:
  rng = np.random.RandomState(0)
  out = [Image.fromarray(rng.randint(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in SIZES_WH]
  rgba = rng.randint(0, 256, (45, 61, 4), dtype=np.uint8)
  out.append(Image.fromarray(rgba, "RGBA"))  # transparency composited onto white
  pal = Image.fromarray(rng.randint(0, 256, (33, 80, 3), dtype=np.uint8)).convert(
      "P", palette=Image.ADAPTIVE, colors=16)
  pal.info["transparency"] = 3  # a palette image with a transparent index
  out.append(pal)
  return out


@pytest.fixture(scope="module")
def hf():
  """family -> (image processor, processor); the tokenizer."""
  tok = _tokenizer()
  check = ProcessorMixin.check_argument_for_proper_class

  def skip_none(self, name, arg):  # no torchvision: the video slot stays None
    return None if arg is None else check(self, name, arg)

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(ProcessorMixin, "check_argument_for_proper_class", skip_none)
    nip = LlavaNextImageProcessorPil(size={"shortest_edge": 28},
                                     crop_size={"height": 28, "width": 28},
                                     image_grid_pinpoints=NEXT_PINPOINTS)
    nproc = LlavaNextProcessor(nip, tok, patch_size=14, vision_feature_select_strategy="default",
                               num_additional_image_tokens=1)
    oip = LlavaOnevisionImageProcessorPil(size={"height": 28, "width": 28},
                                          image_grid_pinpoints=OV_PINPOINTS,
                                          image_mean=[0.5] * 3, image_std=[0.5] * 3)
    oproc = LlavaOnevisionProcessor(oip, tok, None, num_image_tokens=4,
                                    vision_feature_select_strategy="full",
                                    vision_aspect_ratio="anyres_max_1")
  return {"llava_next": (nip, nproc), "llava_onevision": (oip, oproc)}, tok


def _save_processor(proc, path: str) -> None:
  """transformers 5 `save_pretrained` (OneVision: without its None video slot, which the
  saver cannot handle)."""
  if isinstance(proc, LlavaOnevisionProcessor):
    attrs = LlavaOnevisionProcessor.get_attributes()
    with pytest.MonkeyPatch.context() as mp:
      mp.setattr(LlavaOnevisionProcessor, "get_attributes",
                 classmethod(lambda cls: [a for a in attrs if a != "video_processor"]))
      proc.save_pretrained(path)
  else:
    proc.save_pretrained(path)


@pytest.fixture(scope="module")
def specs(hf, tmp_path_factory):
  """family -> spec read back from a directory written by `processor.save_pretrained`."""
  procs, _ = hf
  out = {}
  for family, (_, proc) in procs.items():
    path = str(tmp_path_factory.mktemp(family))
    _save_processor(proc, path)
    out[family] = AnyresImageSpec.from_pretrained(path)
  return out


def _hf_crops(pixel_values_NCCHW: np.ndarray) -> list[int]:
  """Crops per image in transformers' batch-padded pixel values (padding crops are all 0; a
  real crop never is, even its letterbox: black normalizes to -mean/std)."""
  pv = np.asarray(pixel_values_NCCHW)
  return [int((np.abs(x.reshape(x.shape[0], -1)).max(1) > 0).sum()) for x in pv]


def _assert_pixels_equal(ours, ref_pixel_values, ref_sizes):
  ref = np.asarray(ref_pixel_values)
  assert ours.crops == _hf_crops(ref)
  assert max(ours.crops) == ref.shape[1]
  np.testing.assert_array_equal(ours.image_sizes, np.asarray(ref_sizes))
  off = 0
  for i, n in enumerate(ours.crops):
    np.testing.assert_allclose(ours.pixel_values[off:off + n].transpose(0, 3, 1, 2), ref[i, :n],
                               atol=1e-5, rtol=0, err_msg=f"image {i}")
    off += n
  assert off == ours.pixel_values.shape[0]


@pytest.mark.parametrize("family", ["llava_next", "llava_onevision"])
def test_pixels_equal_image_processor(hf, family):
  ip, _ = hf[0][family]
  images = _images()
  spec = AnyresImageSpec.from_hf(ip.to_dict())
  assert spec.family == family
  ours = preprocess_anyres(images, spec)
  assert ours.pixel_values.dtype == np.float32 and ours.pixel_values.shape[1:] == (28, 28, 3)
  assert ours.crops == [geom.num_crops((im.height, im.width), spec.grid_pinpoints, 28)
                        for im in images]
  ref = ip(images, return_tensors="np")
  _assert_pixels_equal(ours, ref["pixel_values"], ref["image_sizes"])
  # the uint8 geometry on its own: [base] + grid, base = the whole image squashed
  crops = anyres_crops(images[3], spec)
  assert crops.dtype == np.uint8 and crops.shape == (ours.crops[3], 28, 28, 3)
  base = np.asarray(images[3].convert("RGB").resize((28, 28), resample=3))
  np.testing.assert_array_equal(crops[0], base)



def test_class_defaults_ragged_grid_equal_image_processor():
  """LlavaNextImageProcessor's own defaults cut 336-multiple pinpoints into 224 crops: the
  edge crops are ragged (112 px) and get resized + centre-cropped like the others."""
  ip = LlavaNextImageProcessorPil()
  spec = AnyresImageSpec.from_hf({"image_processor_type": "LlavaNextImageProcessor"})
  assert (spec.tile, spec.crop_hw) == (224, (224, 224))
  images = _images()[:2]
  ours = preprocess_anyres(images, spec)
  assert ours.crops == [7, 7]  # both pick 336x672 (a tie: least waste) -> 2x3 crops
  ref = ip(images, return_tensors="np")
  _assert_pixels_equal(ours, ref["pixel_values"], ref["image_sizes"])
  with pytest.raises(ValueError, match="not a multiple of the crop tile 224"):
    dataclasses.replace(spec, feature_side=16).image_tokens((40, 70))

def _conversation(n_images: int) -> list[dict]:
  ask = "compare " + " and ".join(["<image>"] * n_images) if n_images > 1 else (
      "<image> describe the image")
  return [{"from": "human", "value": ask}, {"from": "gpt", "value": "a cat and a dog ."}]


def _check_tokens(chat, tok, proc, images, nested, conv, counts):
  """Our ids (counts per image) equal the processor's for the same rendered text."""
  n = sum(len(x) for x in nested) if nested else len(images)
  ours = chat.encode(conv, n, "sample", image_tokens=counts)
  text = chat.render([{"role": "user" if t["from"] == "human" else "assistant",
                       "content": t["value"]} for t in conv])
  ref = proc(images=nested or images, text=text, add_special_tokens=False, return_tensors="np")
  np.testing.assert_array_equal(ours.input_ids, np.asarray(ref["input_ids"])[0])
  # each image run starts where expected and is as long as its count
  runs = np.cumsum([0] + list(counts))[:-1]
  first = int(ours.image_starts[0])
  for start, offset, c in zip(ours.image_starts, runs, counts):
    assert np.all(ours.input_ids[start:start + c] == IMAGE_ID)
    assert ours.input_ids[start + c] != IMAGE_ID
    if len(counts) > 1:
      assert start >= first + offset
  return ref


@pytest.mark.parametrize("family", ["llava_next", "llava_onevision"])
def test_token_ids_equal_processor(hf, specs, family):
  procs, tok = hf
  _, proc = procs[family]
  spec = specs[family]
  chat = ChatTokenizer(tok, IMAGE_ID, 1, TEMPLATE)
  images = _images()
  expected = {"llava_next": [14, 24, 16, 14, 24], "llava_onevision": [7, 10, 8, 7, 7]}[family]
  got = []
  for img in images:
    hw = (img.height, img.width)
    count = spec.image_tokens(hw)
    assert count == len(geom.pack_table(hw, spec.num_crops(hw), 2, spec.grid_pinpoints, 28,
                                        family, spec.vision_aspect_ratio))
    got.append(count)
    _check_tokens(chat, tok, proc, [img], None, _conversation(1), [count])
  assert got[:5] == expected  # NeXT: "default" drops the CLS
  if family == "llava_next":  # several anyres images in one sample
    pair = [images[0], images[3]]
    _check_tokens(chat, tok, proc, pair, None, _conversation(2),
                  [spec.image_tokens((im.height, im.width)) for im in pair])


def test_onevision_multi_image_equals_processor(hf, specs):
  procs, tok = hf
  oip, oproc = procs["llava_onevision"]
  spec = specs["llava_onevision"]
  images = _images()
  nested = [[images[0], images[2]], [images[3]]]  # 2 images in one sample, 1 in the other
  flags = anyres_flags("llava_onevision", [len(s) for s in nested])
  assert flags == [False, False, True]
  flat = [im for s in nested for im in s]
  ours = preprocess_anyres(flat, spec, flags)
  assert ours.crops == [1, 1, 13]
  ref = oproc(images=nested, text=["compare <image> and <image>", "<image> describe"],
              padding=True, return_tensors="np")
  np.testing.assert_array_equal(ref["batch_num_images"], [2, 1])
  _assert_pixels_equal(ours, ref["pixel_values"], ref["image_sizes"])
  # the single crop: padded to a square with the mean colour (0.5 -> 127), then resized
  crop = anyres_crops(images[0], spec, anyres=False)
  assert crop.shape == (1, 28, 28, 3)
  assert np.all(crop[0, 0] == 127) and np.all(crop[0, -1] == 127)  # 70x40: rows pad top/bottom
  # tokens of the two-image sample: s*s + 1 newline each
  counts = [spec.image_tokens((im.height, im.width), anyres=False) for im in nested[0]]
  assert counts == [5, 5]
  chat = ChatTokenizer(tok, IMAGE_ID, 1, TEMPLATE)
  _check_tokens(chat, tok, oproc, None, [nested[0]], _conversation(2), counts)
  with pytest.raises(ValueError, match="no single-crop mode"):
    anyres_crops(images[0], specs["llava_next"], anyres=False)


@pytest.mark.parametrize("family", ["llava_next", "llava_onevision"])
def test_from_pretrained_both_layouts(hf, tmp_path, family):
  ip, proc = hf[0][family]
  want = AnyresImageSpec.from_hf(ip.to_dict())
  # transformers 5 processor.save_pretrained: the image processor inside processor_config.json
  saved = tmp_path / "processor"
  _save_processor(proc, str(saved))
  assert "preprocessor_config.json" not in os.listdir(saved)
  with open(saved / "processor_config.json") as f:
    assert "image_processor" in json.load(f)
  spec = AnyresImageSpec.from_pretrained(str(saved))
  assert spec.crop == want.crop and spec.grid_pinpoints == want.grid_pinpoints
  assert (spec.family, spec.tile, spec.base_hw, spec.feature_side) == (family, 28, (28, 28), 2)
  assert spec.vision_aspect_ratio == ("anyres_max_1" if family == "llava_onevision"
                                      else "anyres_max_9")
  # image_processor.save_pretrained: preprocessor_config.json
  legacy = tmp_path / "legacy"
  ip.save_pretrained(str(legacy))
  assert os.listdir(legacy) == ["preprocessor_config.json"]
  spec2 = AnyresImageSpec.from_pretrained(str(legacy))
  assert spec2 == want and spec2.feature_side is None
  # missing keys take the transformers class defaults
  cls = {"llava_next": LlavaNextImageProcessorPil,
         "llava_onevision": LlavaOnevisionImageProcessorPil}[family]
  bare = AnyresImageSpec.from_hf({"image_processor_type": cls().to_dict()["image_processor_type"]})
  assert bare == AnyresImageSpec.from_hf(cls().to_dict())
  assert bare.crop_hw == {"llava_next": (224, 224), "llava_onevision": (384, 384)}[family]


def test_from_pretrained_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):
    AnyresImageSpec.from_pretrained(str(tmp_path))
  bad = tmp_path / "preprocessor_config.json"
  bad.write_text('{"image_processor_type": "CLIPImageProcessor"}')
  with pytest.raises(ValueError, match=r"preprocessor_config.json: image_processor_type "
                                       r"'CLIPImageProcessor'"):
    AnyresImageSpec.from_pretrained(str(tmp_path))
  bad.write_text('{"image_processor_type": "LlavaNextImageProcessor", '
                 '"image_grid_pinpoints": [[28, 50, 3]]}')
  with pytest.raises(ValueError, match=r"preprocessor_config.json: image_grid_pinpoints must"):
    AnyresImageSpec.from_pretrained(str(tmp_path))
  bad.write_text('{"image_processor_type": "LlavaOnevisionImageProcessor", '
                 '"size": {"longest_edge": 28}}')
  with pytest.raises(ValueError, match=r"preprocessor_config.json: size .* needs"):
    AnyresImageSpec.from_pretrained(str(tmp_path))
  bad.write_text('{"image_processor_type": ')
  with pytest.raises(ValueError, match=r"preprocessor_config.json:1:\d+: malformed JSON"):
    AnyresImageSpec.from_pretrained(str(tmp_path))
  bad.unlink()
  (tmp_path / "processor_config.json").write_text('{"processor_class": "LlavaNextProcessor"}')
  with pytest.raises(ValueError, match=r"processor_config.json: no 'image_processor' section"):
    AnyresImageSpec.from_pretrained(str(tmp_path))


def test_max_image_tokens(specs):
  spec = specs["llava_next"]
  images = _images()
  # 100x60 (W x H) yields 14 tokens, 30x30 yields 24
  assert preprocess_anyres(images[3:4], spec, max_image_tokens=14).crops == [5]
  with pytest.raises(DataError) as e:
    preprocess_anyres(images[:2], spec, max_image_tokens=20, where="data.json record 7",
                      names=["a.png", "b.png"])
  assert e.value.reason == "too_many_image_tokens"
  assert str(e.value) == ("data.json record 7: image 1 (b.png): a 30x30 (WxH) image yields 24 "
                          "image tokens (5 crops), more than max_image_tokens=20")
  limited = AnyresImageSpec.from_hf(  # the field, set by from_pretrained's argument too
      {"image_processor_type": "LlavaNextImageProcessor", "size": {"shortest_edge": 28},
       "crop_size": 28, "image_grid_pinpoints": NEXT_PINPOINTS},
      feature_side=2, max_image_tokens=14)
  with pytest.raises(DataError, match=r"image: a 30x30 \(WxH\) image yields 24 image tokens"):
    anyres_crops(images[1], limited)
  assert anyres_crops(images[0], limited).shape[0] == 5
  with pytest.raises(ValueError, match="max_image_tokens needs feature_side"):
    AnyresImageSpec.from_hf({"image_processor_type": "LlavaNextImageProcessor"},
                            max_image_tokens=10)


def test_per_image_token_counts_errors(hf):
  _, tok = hf
  chat = ChatTokenizer(tok, IMAGE_ID, 3, TEMPLATE)
  conv = _conversation(2)
  with pytest.raises(DataError, match=r"sample: 1 per-image token count\(s\) \(image_tokens\) "
                                      r"for 2 image\(s\)"):
    chat.encode(conv, 2, "sample", image_tokens=[4])
  with pytest.raises(DataError, match=r"2 <image> placeholder\(s\) in the conversation but 1"):
    chat.encode(conv, 1, "sample", image_tokens=[4])
  # without counts the fixed image_seq_len still applies; with them each run has its own
  fixed = chat.encode(conv, 2, "sample")
  assert int((fixed.input_ids == IMAGE_ID).sum()) == 6
  varied = chat.encode(conv, 2, "sample", image_tokens=[2, 5])
  assert int((varied.input_ids == IMAGE_ID).sum()) == 7
  s0, s1 = varied.image_starts
  assert varied.input_ids[s0:s0 + 2].tolist() == [IMAGE_ID] * 2
  assert varied.input_ids[s1:s1 + 5].tolist() == [IMAGE_ID] * 5
  assert varied.input_ids[s0 + 2] != IMAGE_ID and varied.loss_mask[s0:s1 + 5].max() == 0
