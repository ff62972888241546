"""Record -> sample from a model directory, and config -> batches (JSON, tfds, text-only)."""
from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from configs.data import llava_instruct
from mllm_tune.data import DataError, SamplePreparer, normalize
from mllm_tune.data.images import decode_image
from mllm_tune.data.loader import make_batches
from mllm_tune.models.config import CausalLMConfig, LLMConfig, LlavaConfig, VisionConfig
from tests.helpers.data import (CHATML_GEN, chatml_tokenizer, hf_reference, image_bytes,
                                mixed_records, turns, write_llava_dataset)

LLAVA = LlavaConfig(vision=VisionConfig(hidden_size=16, intermediate_size=32, num_layers=1,
                                        num_heads=2, image_size=28, patch_size=14),
                    llm=LLMConfig(vocab_size=320), image_token_id=3)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("model")
  chatml_tokenizer(CHATML_GEN).save_pretrained(d)
  CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}
                        ).save_pretrained(d)
  return str(d)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("data"))
  records, images = mixed_records(20, seed=3)
  return write_llava_dataset(root, records, images), f"{root}/images"


def test_preparer_from_a_model_directory_matches_transformers(model_dir):
  prepare = SamplePreparer.from_pretrained(model_dir, LLAVA, max_len=512)
  images = [image_bytes(40, 25, 1), image_bytes(19, 33, 2, "RGBA")]
  conv = turns("Compare <image> with <image>.", "The first is wider.", "Sure?", "Yes.")
  sample = prepare({"id": "a", "where": "w", "conversations": conv, "images": images})
  ids, mask = hf_reference(chatml_tokenizer(CHATML_GEN), CHATML_GEN, conv, LLAVA.image_seq_len)
  np.testing.assert_array_equal(sample.tokens.input_ids, ids)
  np.testing.assert_array_equal(sample.tokens.loss_mask, mask)
  processor = CLIPImageProcessorPil.from_pretrained(model_dir)
  ref = processor([decode_image(b) for b in images], return_tensors="np")["pixel_values"]
  px = normalize(sample.pixels, prepare.image_spec)
  assert np.abs(px - ref.transpose(0, 2, 3, 1)).max() <= 1e-5


def test_preparer_refuses_an_image_size_the_vision_tower_does_not_take(model_dir):
  cfg = dataclasses.replace(LLAVA, vision=dataclasses.replace(LLAVA.vision, image_size=56))
  with pytest.raises(ValueError, match=r"makes \(28, 28\) images but the vision tower takes "
                                       r"56x56"):
    SamplePreparer.from_pretrained(model_dir, cfg, max_len=512)


def _config(dataset, **kw):
  c = llava_instruct.get_config()
  c.json_path, c.image_folder = dataset
  c.update({**dict(seq_len=320, batch_size=2, num_workers=0, prefetch=0), **kw})
  return c


def test_config_makes_the_same_batches_from_json_and_from_tfds(model_dir, dataset, tmp_path):
  from_json = make_batches(_config(dataset), model_dir, LLAVA)
  from_tfds = make_batches(_config(dataset, kind="tfds", tfds_dir=str(tmp_path), prefetch=2),
                           model_dir, LLAVA)
  m = from_json.spec.max_images
  assert 2 <= m <= 8  # suggested from the data: ~2 samples of ~140 tokens per row
  for _ in range(3):
    a, b = next(from_json), next(from_tfds)
    assert a["input_ids"].shape == (2, 320) and a["pixel_values"].shape == (m, 28, 28, 3)
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  from_tfds.close()


def test_text_only_model_gets_batches_without_images(model_dir, tmp_path):
  records = [{"id": f"t{i}", "conversations": turns(f"question {i}?", "answer " * (i + 1))}
             for i in range(6)]
  records.append({"id": "img", "image": "x.png", "conversations": turns("<image> hi", "yo")})
  path = write_llava_dataset(str(tmp_path), records, {"x.png": image_bytes(8, 8)})
  batches = make_batches(_config((path, str(tmp_path / "images")), num_epochs=1), model_dir,
                         CausalLMConfig(llm=LLMConfig(vocab_size=320)))
  out = list(batches)
  assert all("pixel_values" not in b for b in out)
  assert sum(int(b["segment_ids"].max(1).sum()) for b in out) == 6
  assert batches.report.as_dict() == {"image_count": 1}


def test_unknown_config_field_is_an_error(model_dir, dataset):
  with pytest.raises(ValueError, match=r"unknown field\(s\) \['max_length'\]"):
    make_batches({**_config(dataset).to_dict(), "max_length": 3}, model_dir, LLAVA)
  with pytest.raises(DataError, match="malformed JSON"):
    bad = dataset[0] + ".broken.json"
    with open(bad, "w") as f:
      f.write("[{")
    make_batches(_config((bad, dataset[1])), model_dir, LLAVA)
  for name, text, what in (("empty.json", "[]", "an empty JSON list"),
                           ("empty.jsonl", "\n", "no line could be read")):
    path = os.path.join(os.path.dirname(dataset[0]), name)
    with open(path, "w") as f:
      f.write(text)
    with pytest.raises(DataError, match=rf"{name}: no records \({what}\)"):
      make_batches(_config((path, dataset[1])), model_dir, LLAVA)
