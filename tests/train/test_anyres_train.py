"""LLaVA-OneVision / NeXT end to end: a checkpoint directory saved by transformers + LLaVA-format
JSON with images of many sizes -> our packed batches (equal to what transformers' processor and
model compute per record) -> `mllm-tune train`."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

import mllm_tune as mt
from mllm_tune.cli import main
from mllm_tune.data.loader import make_batches
from tests.helpers import anyres_tiny as at
from tests.helpers.data import packed_cfg, sized_records, write_llava_dataset
from tests.helpers.hf_parity import check_packed_samples, hf_per_record
from tests.helpers.train import lora_train_args, losses


def _hf_per_record(records, images, proc):
  """{token ids: transformers' processor output} of each record, rendered with the checkpoint's
  chat template."""
  from mllm_tune.data.conversation import to_messages

  def encode(rec, imgs):
    text = proc.tokenizer.apply_chat_template(to_messages(rec["conversations"]), tokenize=False)
    return proc(images=[imgs] if imgs else None, text=[text], return_tensors="pt")
  return hf_per_record(records, images, encode)


@pytest.mark.parametrize("family", ["llava_onevision", "llava_next"])
def test_packed_batches_give_transformers_logits_per_record(family, tmp_path):
  d, hf_model, proc = at.model_dir(str(tmp_path), family)
  model, params = mt.load_pretrained(d)
  records, images = sized_records(8, seed=0)
  path = write_llava_dataset(str(tmp_path / "data"), records, images)
  it = make_batches(packed_cfg(path, str(tmp_path / "data" / "images")), d, model.config)
  batch = next(it)
  assert batch["pixel_values"].shape[0] in it.spec.crop_buckets
  checked, with_images = check_packed_samples(model, params, batch,
                                              _hf_per_record(records, images, proc), hf_model)
  assert checked >= 4 and with_images >= 3


def test_mllm_tune_train_lora_on_tiny_onevision(tmp_path, capsys):
  d, _, _ = at.model_dir(str(tmp_path), "llava_onevision")
  records, images = sized_records(24, seed=1)
  write_llava_dataset(str(tmp_path / "data"), records, images)
  run = str(tmp_path / "run")
  code = main(lora_train_args(d, str(tmp_path / "data"), run, 8, 3))
  out, err = capsys.readouterr()
  assert code == 0, err[-3000:]
  curve = losses(run)
  assert len(curve) == 8 and all(np.isfinite(v) for v in curve.values())
  assert min(curve[7], curve[8]) < curve[1]
  summary = json.loads(out.splitlines()[0])
  with open(os.path.join(run, "metrics.jsonl")) as f:
    programs = [json.loads(line)["step_programs"] for line in f if "step_programs" in line]
  # images of six sizes, 8 steps: crop buckets keep the compiled shapes to a handful
  assert summary["step_programs"] == programs[-1] and 1 <= programs[-1] <= 4


def test_image_over_max_image_tokens_is_refused_naming_record_and_image(tmp_path):
  from mllm_tune.data.errors import DataError
  d, _, _ = at.model_dir(str(tmp_path), "llava_onevision")
  model, _ = mt.load_pretrained(d)
  records, images = sized_records(4, seed=0)
  path = write_llava_dataset(str(tmp_path / "data"), records, images)
  cfg = packed_cfg(path, str(tmp_path / "data" / "images"), max_image_tokens=6)
  with pytest.raises(DataError, match=r"data\.json.*image im0_0\.png.*yields 7 image tokens.*"
                                      r"max_image_tokens=6"):
    next(make_batches(cfg, d, model.config))
