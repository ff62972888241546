"""Qwen2-VL / Qwen2.5-VL / Qwen3-VL end to end: a checkpoint directory saved by transformers
(model, a tokenizer with Qwen's chat template, the processor) + LLaVA-format JSON with images of
many sizes -> our packed batches (equal to what transformers' processor and model compute per
record) -> `mllm-tune train` with LoRA (Qwen2.5-VL on two devices; Qwen3-VL then exported as a
PEFT adapter that transformers + peft load with our logits)."""
from __future__ import annotations

import io
import json
import os

import jax
import numpy as np
import pytest
import torch
from PIL import Image

import mllm_tune as mt
from mllm_tune.data.loader import make_batches
from tests.helpers import qwen_video as qvid
from tests.helpers import qwen_vl_tiny as qt
from tests.helpers.data import packed_cfg, sized_records, write_llava_dataset
from tests.helpers.hf_parity import check_packed_samples, hf_per_record
from tests.helpers.train import lora_train_args, losses, run_cli


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_packed_batches_give_transformers_logits_per_record(family, tmp_path):
  d, hf_model, proc = qt.model_dir(str(tmp_path), family)
  model, params = mt.load_pretrained(d)
  records, images = sized_records(8, seed=0)
  path = write_llava_dataset(str(tmp_path / "data"), records, images)
  it = make_batches(packed_cfg(path, str(tmp_path / "data" / "images")), d, model.config)
  batch = next(it)
  ids = batch["input_ids"]
  assert batch["positions"].shape == (3,) + ids.shape
  assert batch["pixel_values"].shape[0] in it.spec.crop_buckets
  assert all(c % 64 == 0 for c in it.spec.crop_buckets) and len(it.spec.crop_buckets) <= 4
  assert ("vision_window_ids" in batch) == (family == "qwen2_5_vl")
  n_patches = int((batch["vision_segment_ids"] > 0).sum())
  assert n_patches < batch["pixel_values"].shape[0]  # padded to its bucket with zero rows
  assert not batch["pixel_values"][n_patches:].any()
  refs = hf_per_record(records, images, qt.encode_record(proc))
  checked, with_images = check_packed_samples(model, params, batch, refs, hf_model)
  assert checked >= 6 and with_images >= 4
  assert max(int(batch["segment_ids"][r].max()) for r in range(ids.shape[0])) >= 2  # packed


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_image_groups_block_the_patch_buffer_per_row_group_with_transformers_logits(family,
                                                                                   tmp_path):
  """`data.image_groups=2`: 4 rows in 2 groups, each group's images in its own patch block
  (G, K, ...), at most max_images / 2 patches a group; every packed sample still gives
  transformers' logits for its record (window layers, deepstack and position taps per block)."""
  d, hf_model, proc = qt.model_dir(str(tmp_path), family)
  model, params = mt.load_pretrained(d)
  records, images = sized_records(12, seed=3)
  path = write_llava_dataset(str(tmp_path / "data"), records, images)
  it = make_batches(packed_cfg(path, str(tmp_path / "data" / "images"), batch_size=4,
                               image_groups=2), d, model.config)
  assert it.spec.image_groups == 2 and all(c % 128 == 0 for c in it.spec.crop_buckets)
  refs = hf_per_record(records, images, qt.encode_record(proc))
  checked = with_images = 0
  for _ in range(2):
    batch = next(it)
    g, k = batch["pixel_values"].shape[:2]
    assert g == 2 and batch["vision_segment_ids"].shape == (2, k) and g * k in it.spec.crop_buckets
    seg = batch["vision_segment_ids"]
    for grp in range(2):  # a group's tokens read only its own block's merged tokens
      rows = slice(2 * grp, 2 * grp + 2)
      taken = batch["pack_index"][rows][batch["pack_weight"][rows] > 0]
      assert ((taken >= grp * k // 4) & (taken < (grp + 1) * k // 4)).all()
      real = seg[grp] > 0
      assert not batch["pixel_values"][grp][~real].any()
      assert (seg[grp][real] > 0).all() and int(real.sum()) <= it.spec.max_images // 2
    ids = seg[seg > 0]
    assert len(set(ids.tolist())) == ids.max()  # 1.. per image over the batch
    c, w = check_packed_samples(model, params, batch, refs, hf_model)
    checked, with_images = checked + c, with_images + w
  assert checked >= 6 and with_images >= 4
  from mllm_tune.data.errors import DataError
  with pytest.raises(DataError, match=r"data\.json.*: \d+ patches of its images but a row group "
                                      r"holds at most max_images / image_groups = 64 / 2"):
    next(make_batches(packed_cfg(path, str(tmp_path / "data" / "images"), batch_size=4,
                                 image_groups=2, crop_buckets=(64,)), d,
                      model.config))
  with pytest.raises(ValueError, match=r"data config: image_groups=3 does not divide "
                                       r"batch_size=4 \(rows per host\)"):
    make_batches(packed_cfg(path, str(tmp_path / "data" / "images"), batch_size=4,
                            image_groups=3), d, model.config)


def test_patch_budget_errors_and_pixel_overrides(tmp_path):
  from mllm_tune.data.errors import DataError
  d, _, _ = qt.model_dir(str(tmp_path))
  model, _ = mt.load_pretrained(d)
  records, images = sized_records(4, seed=0)
  path = write_llava_dataset(str(tmp_path / "data"), records, images)
  folder = str(tmp_path / "data" / "images")
  # data.min_pixels / max_pixels: the image-token runs of a processor built with them
  budget = dict(min_pixels=28 * 28 * 8, max_pixels=28 * 28 * 8)
  batch = next(make_batches(packed_cfg(path, folder, **budget), d, model.config))
  is_img = np.concatenate([[0], batch["input_ids"].reshape(-1) == model.config.image_token_id,
                           [0]])
  runs = np.diff(np.flatnonzero(np.diff(is_img)))[::2]
  hf = qt.image_processor(**budget)
  want = [int(np.prod(g)) // 4 for rec in records for name in np.atleast_1d(rec.get("image", []))
          for g in hf(images=[Image.open(io.BytesIO(images[name]))],
                      return_tensors="np")["image_grid_thw"]]
  assert sorted(runs.tolist()) == sorted(want) and len(want) == 4
  default = qt.image_processor()
  assert want != [int(np.prod(g)) // 4 for rec in records
                  for name in np.atleast_1d(rec.get("image", []))
                  for g in default(images=[Image.open(io.BytesIO(images[name]))],
                                   return_tensors="np")["image_grid_thw"]]
  cfg = packed_cfg(path, folder, max_pixels=28 * 28 * 2, out_of_budget="refuse")
  with pytest.raises(DataError, match=r"data\.json.*image im0_0\.png \(.*/im0_0\.png\): "
                                      r"a 70x40 \(WxH\) image has 2800 pixels, outside the budget "
                                      r"\[min_pixels=784, max_pixels=1568\]"):
    next(make_batches(cfg, d, model.config))
  cfg = packed_cfg(path, folder, max_image_tokens=2)
  with pytest.raises(DataError, match=r"data\.json.*image im2_0\.png \(.*\): a 50x90 \(WxH\) image "
                                      r"yields 6 image tokens .*max_image_tokens=2"):
    next(make_batches(cfg, d, model.config))
  cfg = packed_cfg(path, folder, max_images=64, crop_buckets=(64,))
  assert next(make_batches(cfg, d, model.config))["pixel_values"].shape[0] == 64


def test_mllm_tune_train_lora_on_tiny_qwen2_5_vl_on_two_devices(tmp_path):
  """Images of six sizes and (every eighth record) videos given as frames. The batches depend
  on `data.image_groups` (each group of rows packs under its share of the patch budget), not
  on the mesh: one device with `image_groups=2` trains on the two-device run's batches and
  gives its loss curve."""
  d, _, _ = qt.model_dir(str(tmp_path), "qwen2_5_vl")
  records, images = sized_records(32, seed=1)
  clips, frames = qvid.video_records()
  for k, rec in enumerate(clips[:2] * 2):
    records.insert(8 * k + 3, dict(rec, id=f"{rec['id']}_{k}"))
  write_llava_dataset(str(tmp_path / "data"), records, {**images, **frames})
  run = str(tmp_path / "run")
  res = run_cli(lora_train_args(d, str(tmp_path / "data"), run, 8, 4,
                                "--config.data.max_pixels=9408", "--config.mesh.data=2",
                                "--config.data.on_error=raise"), devices=2)
  assert res.returncode == 0, res.stderr[-3000:]
  curve = losses(run)
  assert len(curve) == 8 and all(np.isfinite(v) for v in curve.values())
  assert min(curve[7], curve[8]) < curve[1]
  summary = json.loads(res.stdout.splitlines()[0])
  with open(os.path.join(run, "metrics.jsonl")) as f:
    programs = [json.loads(line)["step_programs"] for line in f if "step_programs" in line]
  # images of six sizes, 8 steps: patch buckets keep the compiled shapes to a handful
  assert summary["step_programs"] == programs[-1] and 1 <= programs[-1] <= 4
  # data.image_groups defaults to the 2 row shards: each device encodes its rows' images only
  assert "replicated over the 2 data-parallel shards" not in res.stderr
  assert "data.image_groups=2 (the mesh's data-parallel shards" in res.stderr
  one = str(tmp_path / "one")
  res = run_cli(lora_train_args(d, str(tmp_path / "data"), one, 8, 4,
                                "--config.data.max_pixels=9408", "--config.data.image_groups=2",
                                "--config.data.on_error=raise"), devices=1)
  assert res.returncode == 0, res.stderr[-3000:]
  assert "data.image_groups=2" not in res.stderr  # set, not derived from the mesh
  one_curve = losses(one)
  np.testing.assert_allclose([one_curve[s] for s in range(1, 9)],
                             [curve[s] for s in range(1, 9)], rtol=1e-5)
  res = run_cli(lora_train_args(d, str(tmp_path / "data"), str(tmp_path / "flat"), 1, 4,
                                "--config.data.max_pixels=9408", "--config.mesh.data=2",
                                "--config.data.image_groups=1"), devices=2)
  assert res.returncode == 0, res.stderr[-3000:]
  assert "replicated over the 2 data-parallel shards: every device runs the vision" in res.stderr


def test_mllm_tune_train_lora_on_tiny_qwen3_vl_moe_and_export_peft(tmp_path):
  """Qwen3-VL-MoE (deepstack, 16-pixel patches, mixture-of-experts MLPs): `mllm-tune train` with
  the LoRA recipe on LLaVA JSON, its targets widened to the expert stacks (LoRA per expert),
  loss down, checkpoint saved; `mllm-tune export --peft` loads in
  transformers + peft with our trained logits on one record (processor output through
  `mt.hf_inputs`). The directory has Qwen2-VL's processor set to 16-pixel patches:
  Qwen3VLProcessor expands images the same way, but transformers builds its video processor
  only with torchvision. (Dense Qwen3-VL trains in test_qwen3_methods.py; the CLI is the same.)"""
  from peft import PeftModel
  from transformers import Qwen3VLMoeForConditionalGeneration
  from mllm_tune.cli import main
  d, _, proc = qt.model_dir(str(tmp_path), "qwen3_vl_moe")
  records, images = sized_records(16, seed=2)
  write_llava_dataset(str(tmp_path / "data"), records, images)
  run = str(tmp_path / "run")
  res = run_cli(lora_train_args(
      d, str(tmp_path / "data"), run, 4, 4, "--config.data.max_pixels=12288",
      r"--config.method.targets=llm/layers_\d+/(attn/(q|k|v|o)_proj|mlp/experts_(gate_up|down))"))
  assert res.returncode == 0, res.stderr[-3000:]
  curve = losses(run)
  assert len(curve) == 4 and all(np.isfinite(v) for v in curve.values())
  assert curve[4] < curve[3] < curve[1]
  out = str(tmp_path / "peft")
  assert main(["export", run, "--peft", out]) == 0
  with open(os.path.join(out, "adapter_config.json")) as f:
    assert len(json.load(f)["target_parameters"]) == 6  # both stacks of 3 layers
  trained = mt.load_run(run)
  assert trained.step == 4 and trained.model.config.model_type == "qwen3_vl_moe"
  rec = next(r for r in records if isinstance(r.get("image"), list))  # two images
  enc = hf_per_record([rec], images, qt.encode_record(proc)).popitem()[1]
  kw = mt.hf_inputs(trained.model, enc)
  apply = jax.jit(trained.model.apply)  # op by op, the tiny model takes 4x longer on CPU
  ours = np.asarray(apply(trained.variables, **kw))[0]
  assert set(trained.variables) == {"params", "adapters"}
  base = {**trained.variables,
          "adapters": jax.tree.map(np.zeros_like, trained.variables["adapters"])}
  assert np.abs(ours - np.asarray(apply(base, **kw))[0]).max() > 1e-3  # it trained
  peft_model = PeftModel.from_pretrained(Qwen3VLMoeForConditionalGeneration.from_pretrained(d),
                                         out).eval()
  with torch.no_grad():
    ref = peft_model(**enc).logits[0].float().numpy()
  np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family,groups", [("qwen2_5_vl", 1), ("qwen2_5_vl", 2),
                                           ("qwen3_vl", 2)])
def test_two_hosts_batches_joined_as_put_batch_does_give_each_hosts_logits(family, groups,
                                                                          tmp_path):
  """Multi-host `Trainer.put_batch`: rows are split across hosts, image buffers joined in
  process order as blocks (`setup.global_part`: a flat buffer is one block; pack_index and
  vision segment ids rebased), so the global batch computes every host's own logits (Qwen3-VL:
  its position-embedding taps read each image's grid within a block whatever the ids' base)."""
  from mllm_tune.train import setup
  d, _, _ = qt.model_dir(str(tmp_path), family)
  model, params = mt.load_pretrained(d)
  records, images = sized_records(8, seed=0)
  path = write_llava_dataset(str(tmp_path / "data"), records, images)
  cfg = packed_cfg(path, str(tmp_path / "data" / "images"), max_images=256,
                  crop_buckets=(256,), batch_size=2, image_groups=groups)
  it = make_batches(cfg, d, model.config)
  hosts = [next(it), next(it)]  # what two hosts would each read (same shapes)
  rebased = [setup.global_part(b, model.config, rank) for rank, b in enumerate(hosts)]
  assert rebased[0]["pixel_values"].shape[0] == groups and rebased[0]["pixel_values"].ndim == 3
  joined = {k: np.concatenate([b[k] for b in rebased],
                              axis=1 if k == "positions" else 0) for k in hosts[0]}
  apply = lambda b: np.asarray(model.apply({"params": params}, b["input_ids"],
                                           **mt.models.model_kwargs(b)))
  z = apply(joined)
  for rank, b in enumerate(hosts):
    real = b["attention_mask"].astype(bool)
    np.testing.assert_allclose(z[2 * rank:2 * rank + 2][real], apply(b)[real], atol=1e-5)
  # without re-basing, host 1's tokens would take host 0's images
  wrong = {k: np.concatenate([b[k] for b in hosts], axis=1 if k == "positions" else 0)
           for k in hosts[0]}
  assert np.abs(apply(wrong)[2:][hosts[1]["attention_mask"].astype(bool)]
                - z[2:][hosts[1]["attention_mask"].astype(bool)]).max() > 1e-3


def test_grad_accum_steps_on_micro_batches_each_packed_with_its_own_images(tmp_path):
  """`train.grad_accum=2` on LLaVA JSON: each step takes 2 micro-batches of batch_size / 2 rows,
  each packed alone with its own patch buffer (one shape: the row length and the patch budget
  as the only bucket), stacked on a leading axis. The step-1 loss equals the token-weighted
  NLL of the base model (LoRA starts as the identity) over both micro-batches, computed here
  with the model on the loader's batch."""
  from mllm_tune.losses.token import token_ce
  from mllm_tune.models import model_kwargs
  from mllm_tune.train.runs import read_config
  d, _, _ = qt.model_dir(str(tmp_path), "qwen2_5_vl")
  records, images = sized_records(16, seed=3)
  write_llava_dataset(str(tmp_path / "data"), records, images)
  run = str(tmp_path / "run")
  res = run_cli(lora_train_args(d, str(tmp_path / "data"), run, 2, 4,
                                "--config.data.max_pixels=9408", "--config.train.grad_accum=2",
                                "--config.data.on_error=raise"))
  assert res.returncode == 0, res.stderr[-3000:]
  curve = losses(run)
  assert sorted(curve) == [1, 2] and np.isfinite(curve[2])
  o = {**read_config(run).data.to_dict(), "micro_batches": 2, "image_groups": 1,
       "prefetch": 0, "num_workers": 0}
  it = make_batches(o, d, mt.load_pretrained(d)[0].config)
  batch = next(it)
  assert batch["input_ids"].shape == (2, 2, 160)  # (micro-batches, rows each, seq_len)
  assert it.spec.batch_size == 2 and len(it.spec.crop_buckets) == 1
  model, params = mt.load_pretrained(d)
  nll, n = 0.0, 0.0
  for i in range(2):
    mb = {k: v[i] for k, v in batch.items()}
    logits = model.apply({"params": params}, mb["input_ids"], **model_kwargs(mb))
    a, b, _ = token_ce(logits, mb["input_ids"], mb["loss_mask"])
    nll, n = nll + float(a), n + float(b)
  np.testing.assert_allclose(curve[1], nll / n, rtol=1e-5)
  with pytest.raises(ValueError, match=r"batch_size=3 \(rows per host\) is not divisible by "
                                       r"micro_batches=2"):
    make_batches({**o, "batch_size": 3}, d, model.config)
