"""LLaVA-OneVision videos in our LLaVA-JSON data pipeline: frames resized to the tower's crop,
`<video>` expanded to frames x ceil(side / 2)^2 + 1 video tokens (LlavaOnevisionProcessor's
count); packed batches mixing videos and images give transformers' logits per record, the
reference built apart from mllm_tune (transformers' template and processor for text and images,
a float64 NumPy normalization of PIL-resized frames); prompts and in-run evaluation sets too."""
from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

import mllm_tune as mt
from mllm_tune.data.loader import make_batches
from mllm_tune.data.pipeline import SamplePreparer
from tests.helpers import anyres_tiny as at
from tests.helpers import qwen_video as qvid
from tests.helpers.data import packed_cfg, write_llava_dataset
from tests.helpers.hf_parity import (check_eval_set, check_packed_samples,
                                     processor_without_videos)


def _reference(proc, files, folders):
  """`record -> transformers inputs`: the processor's template and images, `<video>` expanded
  to its token count, frames PIL-resized to the crop and normalized in float64."""
  ip, tok = proc.image_processor, proc.tokenizer
  video_id = tok.convert_tokens_to_ids("<video>")
  side = at.CROP // 14
  mean, std = np.asarray(ip.image_mean), np.asarray(ip.image_std)
  open_ = lambda n: Image.open(io.BytesIO(files[n]))

  def encode(rec, add_generation_prompt=False):
    turns = rec["conversations"][:1] if add_generation_prompt else rec["conversations"]
    msgs = [{"role": {"human": "user", "gpt": "assistant"}[t["from"]], "content": t["value"]}
            for t in turns]
    text = tok.apply_chat_template(msgs, tokenize=False,
                                   add_generation_prompt=add_generation_prompt)
    names = [rec["image"]] if "image" in rec else []
    enc = processor_without_videos(proc, [open_(n) for n in names], text)
    ids = enc["input_ids"][0].numpy()
    if "video" in rec:
      v = rec["video"]
      frames = [open_(n).convert("RGB").resize((at.CROP, at.CROP), resample=3)
                for n in (folders[v] if isinstance(v, str) else v)]
      px = np.stack([(np.asarray(f, np.float64) / 255 - mean) / std for f in frames])
      n = len(frames) * math.ceil(side / 2) ** 2 + 1
      at_ = int(np.flatnonzero(ids == video_id)[0])
      ids = np.concatenate([ids[:at_], [video_id] * n, ids[at_ + 1:]])
      enc["pixel_values_videos"] = torch.tensor(px.transpose(0, 3, 1, 2)[None],
                                                dtype=torch.float32)
      enc["input_ids"] = torch.tensor(ids[None])
      enc["attention_mask"] = torch.ones_like(enc["input_ids"])
    return enc
  return encode


@pytest.fixture(scope="module")
def ov(tmp_path_factory):
  root = tmp_path_factory.mktemp("ov_video_data")
  d, hf, proc = at.model_dir(str(root), video=True)
  model, params = mt.load_pretrained(d)
  records, files = qvid.video_records()
  path = write_llava_dataset(str(root / "data"), records, files)
  folders = {"clipA": sorted(k for k in files if k.startswith("clipA/"))}
  return d, hf, proc, model, params, path, records, _reference(proc, files, folders)


def test_packed_batches_with_videos_give_transformers_logits_per_record(ov):
  d, hf, _, model, params, path, records, encode = ov
  assert model.config.video_token_id == hf.config.video_token_id
  import os
  batch = next(make_batches(packed_cfg(path, os.path.join(os.path.dirname(path), "images"),
                                       batch_size=2, seq_len=200), d, model.config))
  refs = {tuple(e["input_ids"][0].tolist()): e for e in map(encode, records)}
  checked, _ = check_packed_samples(model, params, batch, refs, hf)
  assert checked == 4
  vid = model.config.video_token_id
  assert (batch["input_ids"] == vid).sum() == (5 + 1) + (4 + 1)  # 1 x 1 pooled a frame


def test_prompts_and_eval_sets_with_videos(ov):
  import os
  from mllm_tune.data.sources import LlavaJsonSource
  from mllm_tune.eval import vqa_sets
  d, hf, _, model, params, path, records, encode = ov
  prepare = SamplePreparer.from_pretrained(d, model.config, 400)
  src = LlavaJsonSource(path, os.path.join(os.path.dirname(path), "images"))
  rec = src[1]
  np.testing.assert_array_equal(prepare.prompt_ids(rec, prepare(rec)),
                                encode(records[1], True)["input_ids"][0].numpy())
  check_eval_set(model, params, hf, vqa_sets.prepare(src, prepare), prepare.image_spec,
                 [(encode(r), encode(r, True)) for r in records])


def test_truncation_config_checks_and_refusals(ov, tmp_path):
  """A cut inside a video drops it whole; a video processor config that resizes or normalizes
  frames unlike the crops is refused; a tokenizer without the `<video>` token refuses videos."""
  import json
  import os
  import shutil
  from mllm_tune.data.errors import DataError
  from tests.helpers.data import image_bytes
  d, _, _, model, _, _, _, _ = ov
  vid = model.config.video_token_id
  turns = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "a cat"},
           {"from": "human", "value": "<video> and?"}, {"from": "gpt", "value": "blue"}]
  rec = {"conversations": turns, "videos": [[image_bytes(60, 40, seed=k) for k in range(5)]],
         "video_names": ["v"], "where": "rec"}
  full = SamplePreparer.from_pretrained(d, model.config, 400)(rec)
  cols = np.flatnonzero(full.tokens.input_ids == vid)
  assert len(cols) == 6 and full.pixels.shape[0] == 5 and len(full.table) == 6
  cut = SamplePreparer.from_pretrained(d, model.config, int(cols[-1]))(rec)
  assert len(cut.tokens) == cols[0] and cut.pixels.shape[0] == 0 and cut.table is not None
  assert len(cut.table) == 0 and cut.tokens.loss_mask.any()
  bad = str(tmp_path / "bad")
  shutil.copytree(d, bad)
  with open(os.path.join(bad, "video_preprocessor_config.json"), "w") as f:
    json.dump({"size": {"height": 56, "width": 56}, "image_mean": [0.1, 0.2, 0.3]}, f)
  with pytest.raises(ValueError, match=r"video_preprocessor_config.json: the video processor "
                                       r"treats frames unlike .*image_mean .*size \(56, 56\) "
                                       r"!= the crops' \(28, 28\)"):
    SamplePreparer.from_pretrained(bad, model.config, 400)
  plain, _, _ = at.model_dir(str(tmp_path / "plain"))  # no <video> token
  plain_model, _ = mt.load_pretrained(plain)
  with pytest.raises(DataError, match="rec: a video, but this model's data pipeline takes "
                                      "images only"):
    SamplePreparer.from_pretrained(plain, plain_model.config, 400)(rec)
