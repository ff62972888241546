"""LLaVA-OneVision / NeXT end to end: a checkpoint directory saved by transformers + LLaVA-format
JSON with images of many sizes -> our packed batches (equal to what transformers' processor and
model compute per record) -> `mllm-tune train`."""
from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import mllm_tune as mt
from mllm_tune.cli import main
from mllm_tune.data.loader import make_batches
from tests.helpers import anyres_tiny as at
from tests.helpers.data import image_bytes, write_llava_dataset
from tests.helpers.train import losses

SIZES_WH = [(70, 40), (30, 30), (50, 90), (100, 60), (112, 84), (40, 120)]


def _records(n: int, seed: int = 0):
  """One image, two images (OneVision: one crop each) or text only, images of many sizes."""
  rng = np.random.RandomState(seed)
  records, images = [], {}
  for i in range(n):
    kind = i % 4
    names = []
    for j in range({0: 1, 1: 1, 2: 2, 3: 0}[kind]):
      w, h = SIZES_WH[(i + j) % len(SIZES_WH)]
      names.append(f"im{i}_{j}.png")
      images[names[-1]] = image_bytes(w, h, seed=i * 7 + j)
    q = " ".join(["<image>"] * len(names) + ["what", "is", "this"][:1 + i % 3])
    a = " ".join(rng.choice(["a", "cat", "dog", "blue", "red", "square"], 2 + i % 4))
    rec = {"id": str(i), "conversations": [{"from": "human", "value": q},
                                           {"from": "gpt", "value": a}]}
    if len(names) == 1:
      rec["image"] = names[0]
    elif names:
      rec["image"] = names
    records.append(rec)
  return records, images


def _data_cfg(json_path, image_folder, **kw):
  return dict(kind="llava_json", json_path=json_path, image_folder=image_folder, seq_len=160,
              batch_size=3, packing=True, shuffle=False, prefetch=0, on_error="raise", **kw)


def _hf_per_record(records, images, proc):
  """{token ids: transformers' processor output} of each record, rendered with the checkpoint's
  chat template."""
  from mllm_tune.data.conversation import to_messages
  out = {}
  for rec in records:
    names = rec.get("image") or []
    names = [names] if isinstance(names, str) else names
    text = proc.tokenizer.apply_chat_template(to_messages(rec["conversations"]), tokenize=False)
    imgs = [Image.open(io.BytesIO(images[n])) for n in names]
    enc = proc(images=[imgs] if imgs else None, text=[text], return_tensors="pt")
    out[tuple(enc["input_ids"][0].tolist())] = enc
  return out


@pytest.mark.parametrize("family", ["llava_onevision", "llava_next"])
def test_packed_batches_give_transformers_logits_per_record(family, tmp_path):
  d, hf_model, proc = at.model_dir(str(tmp_path), family)
  model, params = mt.load_pretrained(d)
  records, images = _records(8)
  path = write_llava_dataset(str(tmp_path / "data"), records, images)
  it = make_batches(_data_cfg(path, str(tmp_path / "data" / "images")), d, model.config)
  batch = next(it)
  assert batch["pixel_values"].shape[0] in it.spec.crop_buckets
  ours = np.asarray(model.apply({"params": params}, batch["input_ids"],
                                **mt.models.model_kwargs(batch)))
  ref_by_ids = _hf_per_record(records, images, proc)
  checked, with_images = 0, 0
  for r in range(batch["input_ids"].shape[0]):
    for seg in range(1, int(batch["segment_ids"][r].max()) + 1):
      cols = np.flatnonzero(batch["segment_ids"][r] == seg)
      ids = tuple(batch["input_ids"][r, cols].tolist())
      assert ids in ref_by_ids, "a packed sample's tokens differ from the HF processor's"
      with torch.no_grad():
        ref = hf_model(**ref_by_ids[ids]).logits[0].float().numpy()
      np.testing.assert_allclose(ours[r, cols], ref, atol=1e-4)
      checked += 1
      with_images += model.config.image_token_id in ids
  assert checked >= 4 and with_images >= 3


def test_mllm_tune_train_lora_on_tiny_onevision(tmp_path, capsys):
  d, _, _ = at.model_dir(str(tmp_path), "llava_onevision")
  records, images = _records(24, seed=1)
  path = write_llava_dataset(str(tmp_path / "data"), records, images)
  run = str(tmp_path / "run")
  code = main(["train", "--config=configs/experiments/llava_lora.py", "--no-progress",
               f"--config.model.path={d}", f"--config.data.json_path={path}",
               f"--config.data.image_folder={tmp_path}/data/images",
               "--config.data.seq_len=160", "--config.data.batch_size=3",
               "--config.data.num_workers=0", "--config.train.steps=8",
               "--config.train.log_every=1", "--config.train.save_every=8",
               f"--config.run_dir={run}", "--config.optimizer.learning_rate=1e-2"])
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
  records, images = _records(4)
  path = write_llava_dataset(str(tmp_path / "data"), records, images)
  cfg = _data_cfg(path, str(tmp_path / "data" / "images"), max_image_tokens=6)
  with pytest.raises(DataError, match=r"data\.json.*image im0_0\.png.*yields 7 image tokens.*"
                                      r"max_image_tokens=6"):
    next(make_batches(cfg, d, model.config))
