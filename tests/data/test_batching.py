"""Batch iterator: deterministic order, exact resume, prefetch, length policy, bad input."""
from __future__ import annotations

import json
import logging
import os
import re

import numpy as np
import pytest

from mllm_tune.data import (BatchIterator, BatchSpec, ChatTokenizer, DataError, ImageSpec,
                            LlavaJsonSource, Prefetcher, SamplePreparer, epoch_order, fit_length)
from tests.helpers.data import (chatml_tokenizer, image_bytes, mixed_records, turns,
                                write_llava_dataset)

IMAGE_ID, PER_IMAGE, SIZE = 3, 4, 28
IMAGE_SPEC = ImageSpec.clip(SIZE)


class ListSource:
  """Records held in memory (a `Source`), to feed the iterator records of any shape."""

  def __init__(self, records):
    self.records = records

  def __len__(self):
    return len(self.records)

  def __getitem__(self, i):
    rec = self.records[i]
    if isinstance(rec, Exception):
      raise rec
    return rec


@pytest.fixture(scope="module")
def chat():
  return ChatTokenizer(chatml_tokenizer(), IMAGE_ID, PER_IMAGE, "chatml")


@pytest.fixture(scope="module")
def source(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("batching"))
  records, images = mixed_records(24, seed=2)
  return LlavaJsonSource(write_llava_dataset(root, records, images), f"{root}/images")


def _spec(**kw):
  base = dict(batch_size=2, max_len=320, max_images=6, image_seq_len=PER_IMAGE,
              image_token_id=IMAGE_ID, image_hw=(SIZE, SIZE))
  return BatchSpec(**{**base, **kw})


def _iterator(source, chat, max_len=200, overflow="truncate", **kw):
  spec = kw.pop("spec", _spec())
  return BatchIterator(source, SamplePreparer(chat, IMAGE_SPEC, max_len, overflow), spec,
                       IMAGE_SPEC, **kw)


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_epoch_order_is_a_seeded_permutation_per_epoch_and_shards_are_disjoint():
  a, b = epoch_order(50, 7, 0), epoch_order(50, 7, 0)
  np.testing.assert_array_equal(a, b)
  assert sorted(a) == list(range(50)) and not np.array_equal(a, np.arange(50))
  assert not np.array_equal(a, epoch_order(50, 7, 1))
  assert not np.array_equal(a, epoch_order(50, 8, 0))
  shards = [epoch_order(50, 7, 0, shard_index=i, shard_count=3) for i in range(3)]
  assert sorted(np.concatenate(shards)) == list(range(50))


def test_same_seed_same_batches_other_seed_other_batches(source, chat):
  a = _take(_iterator(source, chat, seed=1), 3)
  _assert_same(a, _take(_iterator(source, chat, seed=1), 3))
  b = _take(_iterator(source, chat, seed=2), 3)
  assert not np.array_equal(a[0]["input_ids"], b[0]["input_ids"])


@pytest.mark.parametrize("prefetch", [False, True])
def test_restoring_the_state_after_step_k_yields_the_identical_next_batches(source, chat,
                                                                           prefetch):
  wrap = (lambda it: Prefetcher(it, depth=3)) if prefetch else (lambda it: it)
  workers = 2 if prefetch else 0
  it = wrap(_iterator(source, chat, seed=4, num_workers=workers))
  first = _take(it, 2)
  while not it.get_state()["pending"] and len(first) < 5:  # stop where samples are carried
    first += _take(it, 1)
  state = json.loads(json.dumps(it.get_state()))  # checkpointable as plain JSON
  assert state["pending"], "the state must carry samples read but not yet emitted"
  following = _take(it, 12)  # crosses into the next epoch
  assert it.get_state()["epoch"] >= 1
  resumed = wrap(_iterator(source, chat, seed=4, num_workers=workers))
  resumed.set_state(state)
  _assert_same(following, _take(resumed, 12))
  _assert_same(first, _take(wrap(_iterator(source, chat, seed=4)), len(first)))
  if prefetch:
    it.close()
    resumed.close()


def test_a_state_restored_under_another_packing_budget_is_said_with_the_change(source, chat,
                                                                              caplog):
  """The records continue in the same order under another image budget (the mesh changed
  what `data.image_groups` / the probed budget give), but the batches group them otherwise:
  warned, naming the budget; the same budget restores silently."""
  it = _iterator(source, chat, seed=4)
  _take(it, 2)
  state = json.loads(json.dumps(it.get_state()))
  assert state["layout"] == {"image_groups": 1, "max_images": 6}
  with caplog.at_level(logging.WARNING, logger="mllm_tune"):
    _iterator(source, chat, seed=4).set_state(state)
    assert "packing budget" not in caplog.text
    wider = _iterator(source, chat, seed=4, spec=_spec(max_images=8))
    wider.set_state(state)
  assert re.search(r"another packing budget \(max_images 6 -> 8;.*same records follow in the "
                   r"same order", caplog.text)
  assert wider.index == state["index"]


def test_prefetch_and_parallel_preparation_yield_what_the_iterator_yields(source, chat):
  plain = list(_iterator(source, chat, seed=0, num_epochs=2))
  fetched = list(Prefetcher(_iterator(source, chat, seed=0, num_epochs=2, num_workers=2),
                            depth=2))
  _assert_same(plain, fetched)
  bad = ListSource([DataError("r0: broken", "bad_record")])
  with pytest.raises(DataError, match="r0: broken"):
    next(Prefetcher(_iterator(bad, chat)))


# ----------------------------------------------------------------------------- length policy
def _long_record(chat):
  text = " ".join(["the cat sat on a red mat near two dogs"] * 12)
  return {"id": "long", "where": "d.json record 0 (id=long)",
          "conversations": turns("<image>\n" + text, text, "<image> again " + text, text),
          "images": [image_bytes(20, 20, 0), image_bytes(20, 20, 1)]}


def test_truncation_never_cuts_an_image_run_and_is_counted_with_a_warning(chat, caplog):
  full = chat.encode(_long_record(chat)["conversations"], 2)
  second = int(full.image_starts[1])
  tokens, kept = fit_length(full, second + 2, PER_IMAGE)  # the cut falls inside image 2's run
  assert len(tokens) == second and kept == 1
  np.testing.assert_array_equal(tokens.input_ids, full.input_ids[:second])
  np.testing.assert_array_equal(tokens.loss_mask, full.loss_mask[:second])
  it = _iterator(ListSource([_long_record(chat)]), chat, max_len=second + 2, num_epochs=1,
                 spec=_spec(max_len=second + 2))
  with caplog.at_level(logging.WARNING, "mllm_tune.data"):
    batch = next(it)
  assert batch["attention_mask"].sum() == second and batch["image_valid"].sum() == 1
  assert it.report.as_dict() == {"truncated": 1}
  assert f"d.json record 0 (id=long): truncated from {len(full)} to {second} tokens" \
      in caplog.text


def test_overflow_drop_counts_and_fail_raises_even_when_skipping(chat):
  records = [_long_record(chat), {"id": "ok", "conversations": turns("hi", "hello"),
                                  "images": []}]
  it = _iterator(ListSource(records), chat, max_len=60, overflow="drop", num_epochs=1)
  batches = list(it)
  assert len(batches) == 1 and batches[0]["segment_ids"].max() == 1
  assert it.report.as_dict() == {"too_long": 1}
  it = _iterator(ListSource(records), chat, max_len=60, overflow="fail", on_error="skip")
  with pytest.raises(DataError, match=r"d.json record 0 \(id=long\): \d+ tokens > max_len 60 "
                                      r"\(overflow='fail'\)"):
    next(it)


# ----------------------------------------------------------------------------- bad records
def _bad_records():
  ok = lambda i: {"id": f"ok{i}", "where": f"d.json record {i}",
                  "conversations": turns("<image>\nWhat is it?", "A cat."),
                  "images": [image_bytes(20, 16, i)]}
  png = image_bytes(20, 16, 9)
  return [
      ok(0),
      DataError("d.json record 1 (id=m): image file not found: images/m.jpg", "missing_image"),
      {**ok(2), "id": "corrupt", "where": "d.json record 2", "images": [png[:40]]},
      {**ok(3), "id": "count", "where": "d.json record 3", "images": []},
      {**ok(4), "id": "empty", "where": "d.json record 4",
       "conversations": turns("<image> hi", "")},
      {**ok(5), "id": "many", "where": "d.json record 5",
       "conversations": turns("<image>" * 7, "ok"), "images": [png] * 7},
      ok(6),
  ]


@pytest.mark.parametrize("num_workers", [0, 3])
def test_skip_mode_finishes_the_epoch_and_reports_every_skip(chat, caplog, num_workers):
  it = _iterator(ListSource(_bad_records()), chat, on_error="skip", num_epochs=1,
                 spec=_spec(max_images=6), num_workers=num_workers)
  with caplog.at_level(logging.WARNING, "mllm_tune.data"):
    batches = list(it)
  assert sum(int(b["segment_ids"].max(1).sum()) for b in batches) == 2  # ok0 and ok6
  assert it.report.as_dict() == {"corrupt_image": 1, "empty_turn": 1, "image_count": 1,
                                 "missing_image": 1, "too_many_images": 1}
  assert "data epoch 0 done: 5 record(s) skipped or truncated (corrupt_image: 1, " \
         "empty_turn: 1, image_count: 1, missing_image: 1, too_many_images: 1)" in caplog.text
  assert "d.json record 2: image #0: cannot decode image" in caplog.text


def test_epoch_summary_includes_records_dropped_when_the_source_was_read(chat, tmp_path,
                                                                         caplog):
  good = json.dumps({"id": "a", "conversations": turns("hi", "hello")})
  path = tmp_path / "d.jsonl"
  path.write_text(good + "\n{broken\n" + good + "\n")
  it = _iterator(LlavaJsonSource(str(path), on_error="skip"), chat, num_epochs=1)
  with caplog.at_level(logging.INFO, "mllm_tune.data"):
    assert len(list(it)) == 1
  assert "data epoch 0 done: no records skipped or truncated; when the source was read: " \
         "1 record(s) skipped or truncated (malformed_json: 1)" in caplog.text


def test_an_image_folder_that_is_not_a_directory_is_refused_once(tmp_path):
  """Not one skip per image record (a run that trains on the text-only records): with skipping
  on too, the source refuses the folder up front; text-only records need no folder."""
  with_image = json.dumps({"id": "a", "image": "a.jpg",
                           "conversations": turns("<image>\nwhat?", "red")})
  path = tmp_path / "d.json"
  path.write_text("[" + with_image + "]")
  with pytest.raises(DataError, match=r"d.json: its records name images, but the image folder "
                     r"'.*no_such_dir' is not a directory \(data.image_folder"):
    LlavaJsonSource(str(path), str(tmp_path / "no_such_dir"), on_error="skip")
  path.write_text("[" + json.dumps({"id": "t", "conversations": turns("hi", "hello")}) + "]")
  assert len(LlavaJsonSource(str(path), str(tmp_path / "no_such_dir"))) == 1
  # a JSON file named without a folder: its images are found in the working directory
  (tmp_path / "d.json").write_text("[" + with_image + "]")
  (tmp_path / "a.jpg").write_bytes(b"")
  cwd = os.getcwd()
  try:
    os.chdir(tmp_path)
    assert LlavaJsonSource("d.json").image_folder == ""
  finally:
    os.chdir(cwd)


def test_a_corrupt_image_is_named_by_the_path_it_was_read_from(chat, tmp_path):
  """Not only by its name in the JSON: the folder it was looked up in is part of the message."""
  (tmp_path / "imgs").mkdir()
  (tmp_path / "imgs" / "a.jpg").write_bytes(b"not a jpeg")
  path = tmp_path / "d.json"
  path.write_text(json.dumps([{"id": "r0", "image": "a.jpg",
                               "conversations": turns("<image>\nwhat?", "red")}]))
  it = _iterator(LlavaJsonSource(str(path), str(tmp_path / "imgs")), chat, num_epochs=1)
  full = os.path.join(str(tmp_path / "imgs"), "a.jpg")
  with pytest.raises(DataError, match=r"d.json record 0 \(id=r0\): image a.jpg \("
                     + re.escape(full) + r"\): cannot decode image"):
    next(iter(it))


@pytest.mark.parametrize("index, message", [
    (1, r"image file not found: images/m.jpg"),
    (2, r"d.json record 2: image #0: cannot decode image"),
    (3, r"d.json record 3: 1 <image> placeholder\(s\) in the conversation but 0 image\(s\)"),
    (4, r"d.json record 4: conversations\[1\] \(gpt\) is an empty assistant turn"),
    (5, r"d.json record 5: 7 image\(s\) but a batch holds at most max_images=6"),
])
def test_raise_mode_stops_at_the_bad_record_with_its_message(chat, index, message):
  records = _bad_records()
  it = _iterator(ListSource([records[0], records[index]]), chat, shuffle=False)
  with pytest.raises(DataError, match=message):
    next(it)


def test_an_epoch_without_one_usable_record_is_an_error(chat):
  it = _iterator(ListSource(_bad_records()[1:6]), chat, on_error="skip")
  with pytest.raises(DataError, match=r"data epoch 0: none of the 5 records could be used"):
    next(it)
