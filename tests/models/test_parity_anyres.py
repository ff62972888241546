"""LLaVA-NeXT and LLaVA-OneVision against transformers: logits, greedy generation, checkpoints
both ways and PEFT adapters, on padded batches whose rows hold images of different sizes."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

import mllm_tune as mt
from mllm_tune.models.config import ConfigError
from tests.helpers import anyres_tiny as at, hf_tiny
from tests.helpers.hf_parity import (assert_same_tensors, check_peft_lora_both_ways,
                                     safetensors_tensors)

ATOL = 1e-4
SIZES = [(60, 100), (30, 30), (90, 50)]  # (H, W): wide, square, tall
CASES = {  # name: (builder, batch_num_images of the 3 rows or None)
    "next": (at.llava_next, None),
    "onevision_anyres": (at.llava_onevision, None),        # every image tiled, downsampled
    "onevision_multi_image": (at.llava_onevision, [1, 2, 0]),  # row 1's images: 1 crop each
}


def _load(build, tmp_path, dtype=None):
  hf_model = build()
  d = str(tmp_path / "hf")
  (hf_model.to(dtype) if dtype else hf_model).save_pretrained(d)
  return hf_model, d, *mt.load_pretrained(d)


def _batch(model, bni, side):
  """Row 0: one image; row 1: two images of different sizes; row 2: text only."""
  px, sizes, crops, toks = at.image_inputs(model.config, SIZES, bni and [1, 2])
  img = lambda n: [hf_tiny.IMAGE_TOKEN] * n
  rows = [[1, 5] + img(toks[0]) + [7, 8, 9],
          [1, 3] + img(toks[1]) + [4] + img(toks[2]) + [6, 11], [1, 20, 21, 22]]
  ids, mask = hf_tiny.padded_batch(rows, side)
  enc = {"input_ids": ids, "attention_mask": mask, "pixel_values": px, "image_sizes": sizes}
  if bni:
    enc["batch_num_images"] = np.asarray(bni)
  return enc, crops, toks


def _hf_logits(hf_model, enc):
  return at.hf_forward(hf_model, enc["input_ids"], enc["attention_mask"], enc["pixel_values"],
                       enc["image_sizes"], enc.get("batch_num_images"))


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(case, tmp_path):
  build, bni = CASES[case]
  hf_model, _, model, params = _load(build, tmp_path)
  enc, crops, toks = _batch(model, bni, ["right", "left", "right"])
  if case == "onevision_anyres":
    assert len(set(toks)) == 3 and max(crops) > 5  # sizes differ, downsampling is exercised
  if case == "onevision_multi_image":
    assert crops[1:] == [1, 1]
  kw = mt.hf_inputs(model, enc)
  assert kw["pixel_values"].shape == (sum(crops), 28, 28, 3)
  ours = np.asarray(model.apply({"params": params}, **kw))
  ref = _hf_logits(hf_model, enc)
  real = enc["attention_mask"].astype(bool)
  np.testing.assert_allclose(ours[real], ref[real], atol=ATOL, rtol=0)


@pytest.mark.parametrize("case", ["next", "onevision_multi_image"])
def test_greedy_generation_matches_hf_generate(case, tmp_path):
  build, bni = CASES[case]
  hf_model, _, model, params = _load(build, tmp_path)
  enc, _, _ = _batch(model, bni, ["right", "left", "right"])
  ours = np.asarray(mt.generate(model, params, **mt.hf_inputs(model, enc), max_new_tokens=20))
  ids, mask = mt.eval.generate.left_pad(enc["input_ids"], enc["attention_mask"])
  kw = {} if bni is None else {"batch_num_images": torch.tensor(bni)}
  enc_left = dict(enc, input_ids=ids, attention_mask=mask)
  assert not np.array_equal(mt.hf_inputs(model, enc_left)["pack_index"],
                            mt.hf_inputs(model, enc)["pack_index"])  # the tables really moved
  with torch.no_grad():
    ref = hf_model.generate(
        input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
        pixel_values=torch.tensor(enc["pixel_values"]),
        image_sizes=torch.tensor(enc["image_sizes"]), max_new_tokens=20, do_sample=False,
        num_beams=1, pad_token_id=0, eos_token_id=None, **kw)[:, ids.shape[1]:].numpy()
  np.testing.assert_array_equal(ours, ref)
  assert len(set(ours[0].tolist())) > 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["next", "onevision_anyres"])
def test_hf_ours_hf_is_bit_exact_and_loads_in_transformers(case, dtype, tmp_path):
  build, bni = CASES[case]
  hf_model, src, model, params = _load(build, tmp_path, dtype)
  assert "image_newline" in params
  dst = str(tmp_path / "dst")
  mt.save_pretrained(dst, model, params, max_shard_size="40KB")
  assert os.path.exists(os.path.join(dst, "model.safetensors.index.json"))
  a, b = safetensors_tensors(src), safetensors_tensors(dst)
  assert any(k.endswith("image_newline") for k in a)
  assert_same_tensors(a, b)
  with open(os.path.join(dst, "config.json")) as f:
    written = json.load(f)
  assert written["model_type"] == model.config.model_type
  back, info = type(hf_model).from_pretrained(dst, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  enc, _, _ = _batch(model, bni, "right")
  orig = type(hf_model).from_pretrained(src).eval()  # the same loading path as `back`
  np.testing.assert_array_equal(_hf_logits(back.eval(), enc), _hf_logits(orig, enc))


@pytest.mark.parametrize("case", ["next", "onevision_anyres"])
def test_peft_lora_both_ways_with_logit_parity(case, tmp_path):
  build, bni = CASES[case]
  hf_model, base_dir, model, params = _load(build, tmp_path)
  enc, _, _ = _batch(model, bni, "right")
  check_peft_lora_both_ways(hf_model, base_dir, model, params, enc, _hf_logits, build, tmp_path)


def test_placeholder_count_mismatch_names_both_counts(tmp_path):
  _, _, model, params = _load(at.llava_next, tmp_path)
  enc, _, toks = _batch(model, None, "right")
  enc["input_ids"] = enc["input_ids"].copy()
  enc["input_ids"][0, 2] = 5  # one image token less in row 0
  with pytest.raises(ValueError, match=rf"{sum(toks) - 1} image tokens .* yield {sum(toks)}"):
    mt.hf_inputs(model, enc)


def test_unsupported_model_type_lists_the_supported_ones(tmp_path):
  d = tmp_path / "m"
  d.mkdir()
  (d / "config.json").write_text(json.dumps({"model_type": "llava_next_video"}))
  with pytest.raises(ConfigError, match=r"llava_next_video.*'llava', 'llava_next', "
                                        r"'llava_onevision', 'llama'"):
    mt.load_pretrained(str(d))
