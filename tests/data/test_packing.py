"""Packing: same per-sample loss as unpacked through the model; batch layout; density."""
from __future__ import annotations

import importlib.util
import os

import jax
import numpy as np
import pytest

from mllm_tune.data import (BatchIterator, BatchSpec, ChatTokenizer, ImageSpec, Item,
                            LlavaJsonSource, Planner, SamplePreparer, preprocess,
                            suggest_max_images)
from mllm_tune.data.images import decode_image
from mllm_tune.data.targets import next_token_nll, segment_losses
from mllm_tune.models import build_model, param_shapes
from mllm_tune.models.config import LLMConfig, LlavaConfig, VisionConfig
from tests.helpers import ROOT
from tests.helpers.data import chatml_tokenizer, mixed_records, write_llava_dataset

IMAGE_ID, PER_IMAGE, SIZE = 3, 4, 28  # 28 px / 14 px patches -> 4 image tokens (CLS dropped)
IMAGE_SPEC = ImageSpec.clip(SIZE)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("packing"))
  records, images = mixed_records(16, seed=1)
  source = LlavaJsonSource(write_llava_dataset(root, records, images), f"{root}/images")
  chat = ChatTokenizer(chatml_tokenizer(), IMAGE_ID, PER_IMAGE, "chatml")
  return source, SamplePreparer(chat, IMAGE_SPEC, max_len=200)  # samples: 92 to 269 tokens


def _spec(**kw) -> BatchSpec:
  base = dict(batch_size=2, max_len=320, max_images=6, image_seq_len=PER_IMAGE,
              image_token_id=IMAGE_ID, image_hw=(SIZE, SIZE))
  return BatchSpec(**{**base, **kw})


def _image_slots(batch) -> np.ndarray:
  """(B, T) slot index of each image token (image runs in row-major order), -1 elsewhere."""
  is_img = batch["input_ids"] == IMAGE_ID
  order = (np.cumsum(is_img.reshape(-1)) - 1).reshape(is_img.shape) // PER_IMAGE
  return np.where(is_img, order, -1)


def _segments(batch):
  for r in range(batch["input_ids"].shape[0]):
    for k in range(1, batch["segment_ids"][r].max() + 1):
      yield r, k, batch["segment_ids"][r] == k


def test_packed_batch_gives_the_same_per_sample_loss_as_unpacked(pipeline):
  source, prepare = pipeline
  batch = next(BatchIterator(source, prepare, _spec(), IMAGE_SPEC, seed=3))
  seg = batch["segment_ids"]
  assert seg.max() >= 2, "the batch must pack several samples in a row"
  assert 0 < batch["image_valid"].sum() < len(batch["image_valid"]), "real and dummy images"
  cfg = LlavaConfig(
      vision=VisionConfig(hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                          image_size=SIZE, patch_size=14),
      llm=LLMConfig(vocab_size=320, hidden_size=32, intermediate_size=48, num_layers=2,
                    num_heads=4, num_kv_heads=2, head_dim=8), image_token_id=IMAGE_ID)
  model = build_model(cfg)
  assert cfg.image_seq_len == PER_IMAGE
  rng = np.random.default_rng(0)  # random params without compiling the init (fast)
  params = jax.tree.map(lambda s: (rng.normal(size=s.shape) * 0.2).astype(np.float32),
                        param_shapes(model))
  apply = jax.jit(lambda ids, mask, pos, seg_ids, px: model.apply(
      {"params": params}, ids, mask, positions=pos, segment_ids=seg_ids, pixel_values=px))

  logits = apply(batch["input_ids"], batch["attention_mask"], batch["positions"], seg,
                 batch["pixel_values"])
  nll = next_token_nll(logits, batch["input_ids"], batch["loss_mask"])
  packed, counts = segment_losses(nll, batch["loss_mask"], seg, int(seg.max()))
  # attention across the samples of a row (one segment, running positions) gives other
  # losses: the test can fail
  mask = batch["attention_mask"]
  leaky = next_token_nll(apply(batch["input_ids"], mask, np.maximum(np.cumsum(mask, 1) - 1, 0),
                               mask, batch["pixel_values"]), batch["input_ids"],
                         batch["loss_mask"])
  leaky_loss, _ = segment_losses(leaky, batch["loss_mask"], seg, int(seg.max()))
  assert np.abs(np.asarray(leaky_loss - packed)).max() > 1e-3

  slots = _image_slots(batch)
  n_checked = 0
  for r, k, where in _segments(batch):
    # the sample alone in a batch of one (right-padded to T: one compile per image count)
    n = int(where.sum())
    ids = np.zeros((1, seg.shape[1]), np.int32)
    ids[0, :n] = batch["input_ids"][r][where]
    mask = np.zeros_like(ids)
    mask[0, :n] = batch["loss_mask"][r][where]
    real = (np.arange(seg.shape[1]) < n)[None].astype(np.int32)
    own = np.unique(slots[r][where & (slots[r] >= 0)])
    px = batch["pixel_values"][own] if len(own) else None
    alone = next_token_nll(apply(ids, real, np.arange(seg.shape[1])[None] * real, real, px),
                           ids, mask)
    alone_loss = float(alone.sum() / mask.sum())
    assert counts[r, k - 1] == mask.sum() > 0
    np.testing.assert_allclose(float(packed[r, k - 1]), alone_loss, rtol=2e-5)
    n_checked += 1
  assert n_checked == int((seg.max(axis=1)).sum())


def test_batch_layout_segments_positions_masks_and_image_slots(pipeline):
  source, prepare = pipeline
  samples = [prepare(source[i]) for i in range(len(source))]
  by_ids = {s.tokens.input_ids.tobytes(): (i, s) for i, s in enumerate(samples)}
  spec = _spec()
  seen = []
  for batch in BatchIterator(source, prepare, spec, IMAGE_SPEC, seed=5, num_epochs=1):
    ids, seg, pos, loss = (batch[k] for k in ("input_ids", "segment_ids", "positions",
                                              "loss_mask"))
    assert ids.shape == (2, 320) and batch["pixel_values"].shape == (6, SIZE, SIZE, 3)
    np.testing.assert_array_equal(batch["attention_mask"], seg > 0)
    assert np.sum(ids == IMAGE_ID) == spec.max_images * PER_IMAGE  # M runs, dummies included
    assert not loss[seg == 0].any() and not loss[ids == IMAGE_ID].any()
    slots = _image_slots(batch)
    dummy_slots = np.unique(slots[(seg == 0) & (slots >= 0)])
    np.testing.assert_array_equal(batch["image_valid"][dummy_slots], 0)
    assert np.all(batch["pixel_values"][batch["image_valid"] == 0] == 0)
    assert batch["image_valid"].sum() + len(dummy_slots) == spec.max_images
    for r, k, where in _segments(batch):
      np.testing.assert_array_equal(pos[r][where], np.arange(where.sum()))
      assert loss[r][where][0] == 0
      i, sample = by_ids[ids[r][where].tobytes()]  # the segment is one prepared sample, whole
      np.testing.assert_array_equal(loss[r][where], sample.tokens.loss_mask)
      own = np.unique(slots[r][where & (slots[r] >= 0)])
      assert batch["image_valid"][own].all()
      rec = source[i]  # its images, in the record's order
      ref = preprocess([decode_image(b) for b in rec["images"]], IMAGE_SPEC)
      np.testing.assert_allclose(batch["pixel_values"][own], ref, atol=1e-6)
      seen.append(i)
  assert sorted(seen) == list(range(len(source)))  # an epoch emits every sample exactly once


def test_padding_mode_pads_each_sample_to_the_smallest_bucket(pipeline):
  source, prepare = pipeline
  buckets = (128, 224, 320)
  spec = _spec(packing=False, batch_size=3, bucket_lengths=buckets, max_images=6)
  used = set()
  for batch in BatchIterator(source, prepare, spec, IMAGE_SPEC, seed=0, num_epochs=1):
    t = batch["input_ids"].shape[1]
    assert t in buckets and batch["segment_ids"].max() <= 1
    fills = batch["attention_mask"].sum(1)
    need = spec.max_images - batch["image_valid"].sum()  # dummy runs that need padding room
    assert sum((t - fills) // PER_IMAGE) >= need
    if t > buckets[0]:  # the next smaller bucket is too short or lacks the dummy room
      smaller = buckets[buckets.index(t) - 1]
      assert fills.max() > smaller or sum((smaller - fills) // PER_IMAGE) < need
    used.add(t)
  assert len(used) >= 2


def planned(spec: BatchSpec, items: list[Item]):
  """Feeds `items` in order to a Planner as it asks for more; yields each batch's rows."""
  planner, k = Planner(spec), 0
  while True:
    while planner.wants_more() and k < len(items):
      planner.add(items[k])
      k += 1
    rows = planner.next_batch()
    if not rows:
      return
    yield rows


def test_planner_emits_every_item_once_and_never_starves_one():
  rng = np.random.default_rng(0)
  spec = BatchSpec(batch_size=4, max_len=512, max_images=10, image_seq_len=64,
                   image_token_id=1, image_hw=(1, 1))
  items = [Item(i, int(rng.integers(70, 500)), int(rng.random() < 0.7)) for i in range(600)]
  items = [Item(i.key, max(i.length, 64 * i.images + 1), i.images) for i in items]
  emitted, step = {}, 0
  for rows in planned(spec, items):
    assert sum(i.images for row in rows for i in row) <= spec.max_images
    for row in rows:
      assert sum(i.length for i in row) <= spec.max_len
      for i in row:
        assert i.key not in emitted
        emitted[i.key] = step
    step += 1
  assert sorted(emitted) == list(range(len(items)))
  # arrival batch of item i is at least i / (items per batch); waits stay short
  per_batch = len(items) / step
  assert max(emitted[i] - i / per_batch for i in emitted) < 12


def _bench():
  path = os.path.join(ROOT, "perf", "packing_density.py")
  spec = importlib.util.spec_from_file_location("packing_density", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_packing_density_on_a_llava_like_mix_is_at_least_0_9():
  report = _bench().density_report(n=3000, batch_size=8, max_len=2048)
  assert report["packed"] >= 0.9
  assert report["padded_max_len"] < 0.5 and report["padded_buckets"] < 0.7


def test_image_slots_are_bounded_so_every_sample_fits_an_empty_batch():
  common = dict(batch_size=8, max_len=2048, image_seq_len=576, image_token_id=1,
                image_hw=(1, 1))
  with pytest.raises(ValueError, match=r"max_images=22 > 21: with image runs of 576 tokens"):
    BatchSpec(max_images=22, **common)
  spec = BatchSpec(max_images=21, **common)
  for worst in (Item(0, 2048, 0), Item(1, 2048, 1), Item(2, 1500, 0)):
    planner = Planner(spec)
    planner.add(worst)
    assert [i.key for row in planner.next_batch() for i in row] == [worst.key]
  assert suggest_max_images([767] * 10, [1] * 10, 8, 2048, 576) == 21  # 8*2048/767 = 21.4
  assert suggest_max_images([300] * 10, [1] * 10, 8, 2048, 576) == 21  # capped
  assert suggest_max_images([300] * 10, [0, 2] * 5, 8, 2048, 576, packing=False) == 16


def test_qwen_patch_budget_planner_counts_patches_in_coarse_units_never_over_budget():
  """A Qwen2-VL patch budget above 512 is searched in units (image_unit), items rounded up:
  no batch exceeds the budget, every item is emitted once, and batches still fill most of it."""
  common = dict(batch_size=4, max_len=512, image_token_id=1, image_hw=(14, 14), merge_unit=4)
  spec = BatchSpec(max_images=4096, crop_buckets=(1024, 2048, 3072, 4096), **common)
  assert spec.qwen and spec.tables and spec.image_unit == 8
  rng = np.random.default_rng(1)
  items = [Item(i, int(rng.integers(40, 500)), 4 * int(rng.integers(0, 300)))
           for i in range(400)]
  emitted, used = set(), []
  for rows in planned(spec, items):
    patches = sum(i.images for row in rows for i in row)
    assert patches <= spec.max_images
    used.append(patches / spec.max_images)
    for row in rows:
      assert sum(i.length for i in row) <= spec.max_len
      emitted.update(i.key for i in row)
  assert emitted == set(range(len(items)))
  assert np.mean(used[:-3]) > 0.6
  with pytest.raises(ValueError, match=r"patch buckets \(64, 130\) must be multiples of "
                                       "merge_unit 4"):
    BatchSpec(max_images=130, crop_buckets=(64, 130), **common)
  with pytest.raises(ValueError, match="exclude each other"):
    BatchSpec(max_images=64, crop_features=4, **common)


@pytest.mark.parametrize("packing", [True, False])
def test_qwen_image_groups_bound_each_row_groups_patches(packing):
  """`image_groups=2`: rows 0-1 and 2-3 each hold at most max_images / 2 patches (their patch
  block), the batch total stays within max_images, every item is emitted once; without groups
  the same items put more than half the budget into one group."""
  common = dict(batch_size=4, max_len=512, image_token_id=1, image_hw=(14, 14), merge_unit=4,
                max_images=1024, crop_buckets=(512, 1024), packing=packing)
  rng = np.random.default_rng(2)
  items = [Item(i, int(rng.integers(40, 300)), 4 * int(rng.integers(0, 100)))
           for i in range(300)]

  def group_loads(spec):
    emitted, loads = set(), []
    for rows in planned(spec, items):
      loads.append([sum(i.images for row in rows[g:g + 2] for i in row) for g in (0, 2)])
      emitted.update(i.key for row in rows for i in row)
    return emitted, loads

  grouped = BatchSpec(image_groups=2, **common)
  emitted, loads = group_loads(grouped)
  assert emitted == set(range(len(items)))
  assert max(max(load) for load in loads) <= 512
  _, free = group_loads(BatchSpec(**common))
  assert max(max(load) for load in free) > 512
  with pytest.raises(ValueError, match=r"image_groups=2: needs a Qwen2-VL spec whose "
                                       r"batch_size \(3\)"):
    BatchSpec(image_groups=2, **{**common, "batch_size": 3})
  with pytest.raises(ValueError, match=r"buckets multiples of 2 \* merge_unit"):
    BatchSpec(image_groups=2, **{**common, "crop_buckets": (36, 1024)})
