"""Sources: LLaVA JSON / JSONL with an image folder, tfds array_record shards; bad files."""
from __future__ import annotations

import json
import os

import pytest

from mllm_tune.data.errors import DataError
from mllm_tune.data.sources import LlavaJsonSource, Source, TfdsSource, build_tfds
from tests.helpers.data import mixed_records, turns, write_llava_dataset


def test_json_and_jsonl_sources_give_the_same_records_with_image_bytes(tmp_path):
  records, images = mixed_records(6)
  folder = str(tmp_path / "images")
  js = LlavaJsonSource(write_llava_dataset(str(tmp_path), records, images), folder)
  jl = LlavaJsonSource(write_llava_dataset(str(tmp_path), records, images, "data.jsonl"), folder)
  assert isinstance(js, Source) and len(js) == len(jl) == 6
  for i, rec in enumerate(records):
    a, b = js[i], jl[i]
    assert a["id"] == b["id"] == rec["id"]
    assert a["conversations"] == b["conversations"] == rec["conversations"]
    names = rec.get("image", [])
    names = [names] if isinstance(names, str) else names
    assert a["images"] == b["images"] == [images[n] for n in names]
    assert a["where"] == f"{tmp_path}/data.json record {i} (id={rec['id']})"
    assert b["where"] == f"{tmp_path}/data.jsonl:{i + 1} (id={rec['id']})"


def test_tfds_builder_converts_once_and_reads_back_by_random_access(tmp_path):
  records, images = mixed_records(7)
  path = write_llava_dataset(str(tmp_path / "src"), records, images)
  folder, data_dir = str(tmp_path / "src" / "images"), str(tmp_path / "tfds")
  ds_dir, report = build_tfds(path, data_dir, folder)
  assert not report.counts
  shards = [f for f in os.listdir(ds_dir) if ".array_record" in f]
  assert shards, os.listdir(ds_dir)
  src, ref = TfdsSource(ds_dir), LlavaJsonSource(path, folder)
  assert isinstance(src, Source) and len(src) == 7
  for i in [6, 0, 3, 1]:  # random access, in the original order
    a, b = src[i], ref[i]
    assert a == {k: v for k, v in b.items() if k != "image_paths"}  # shards hold no paths
  # converted once: a second build reuses the shards even without the source files
  os.remove(path)
  assert build_tfds(path, data_dir, folder)[0] == ds_dir
  assert TfdsSource(ds_dir)[5] == {k: v for k, v in ref[5].items() if k != "image_paths"}


def test_tfds_conversion_skips_records_with_missing_images_when_told(tmp_path):
  records, images = mixed_records(4)
  del images["0.png"]
  path = write_llava_dataset(str(tmp_path / "src"), records, images)
  folder = str(tmp_path / "src" / "images")
  with pytest.raises(DataError, match=r"record 0 \(id=s0\): image file not found: .*0.png"):
    build_tfds(path, str(tmp_path / "tfds_raise"), folder)
  ds_dir, report = build_tfds(path, str(tmp_path / "tfds_skip"), folder, on_error="skip")
  assert report.as_dict() == {"missing_image": 1}
  assert [TfdsSource(ds_dir)[i]["id"] for i in range(3)] == ["s1", "s2", "s3"]


# ----------------------------------------------------------------------------- bad input
def test_malformed_json_reports_file_line_and_column(tmp_path):
  path = tmp_path / "bad.json"
  path.write_text('[\n  {"id": "a", "conversations": []},\n  {"id": "b",, }\n]')
  with pytest.raises(DataError, match=r"bad.json:3:14: malformed JSON: Expecting property name"):
    LlavaJsonSource(str(path))


def test_malformed_jsonl_line_is_reported_or_skipped(tmp_path):
  good = json.dumps({"id": "a", "conversations": turns("hi", "hello")})
  path = tmp_path / "bad.jsonl"
  path.write_text(good + "\n\n{oops\n" + good.replace('"a"', '"b"') + "\n")
  with pytest.raises(DataError, match=r"bad.jsonl:3: malformed JSON line \(Expecting property "
                                      r"name enclosed in double quotes at column 2\)"):
    LlavaJsonSource(str(path))
  src = LlavaJsonSource(str(path), on_error="skip")
  assert [src[i]["id"] for i in range(len(src))] == ["a", "b"]
  assert src.report.as_dict() == {"malformed_json": 1}


def test_bad_record_fields_are_reported_with_record_and_field(tmp_path):
  recs = [{"id": "ok", "conversations": turns("hi", "hello")},
          {"id": "noconv"},
          {"id": "badimg", "image": 3, "conversations": turns("<image> hi", "hello")},
          {"id": "empty", "conversations": turns("hi", "")}]
  path = write_llava_dataset(str(tmp_path), recs, {})
  with pytest.raises(DataError, match=r"data.json record 1 \(id=noconv\): field "
                                      r"'conversations' is missing"):
    LlavaJsonSource(path)
  src = LlavaJsonSource(path, on_error="skip")
  assert len(src) == 1
  assert src.report.as_dict() == {"bad_record": 2, "empty_turn": 1}


def test_missing_image_is_reported_when_read(tmp_path):
  recs = [{"id": "m1", "image": "nope.jpg", "conversations": turns("<image> hi", "hello")}]
  src = LlavaJsonSource(write_llava_dataset(str(tmp_path), recs, {}), str(tmp_path / "images"))
  with pytest.raises(DataError, match=r"record 0 \(id=m1\): image file not found: "
                                      r".*images/nope.jpg") as e:
    src[0]
  assert e.value.reason == "missing_image"


def test_tfds_shards_keep_video_records(tmp_path):
  """Records with videos (a frame folder with fps, a frame list without) read back from the
  shards exactly as from the JSON."""
  from tests.helpers.qwen_video import video_records
  records, files = video_records()
  records[0]["fps"] = 0.96  # not a float32 number: kept exactly
  path = write_llava_dataset(str(tmp_path / "src"), records, files)
  folder = str(tmp_path / "src" / "images")
  ds_dir, report = build_tfds(path, str(tmp_path / "tfds"), folder)
  src, ref = TfdsSource(ds_dir), LlavaJsonSource(path, folder)
  assert not report.counts and len(src) == len(records)
  for i in range(len(records)):
    assert src[i] == {k: v for k, v in ref[i].items() if k != "image_paths"}
  assert [len(v) for v in src[0]["videos"]] == [5] and src[0]["video_fps"] == [0.96]
  assert src[1]["video_fps"] == [None] and "videos" not in src[2]
