"""Record sources: LLaVA JSON / JSONL with an image folder, and tfds array_record shards.

A source is anything with `__len__` and `__getitem__(i) -> record` (random access keeps
shuffling and resume exact). A record is a plain dict:

  {"id": str, "conversations": [{"from": "human" | "gpt" | "system", "value": str}, ...],
   "images": [bytes, ...],          # encoded files (JPEG / PNG ...), decoded later with PIL
   "image_names": [str, ...],       # for error messages
   "image_paths": [str, ...],       # JSON sources: the files read (error messages too)
   "videos": [[bytes, ...]],        # with a "video" field: its frames, encoded (see below)
   "video_names": [str], "video_fps": [float | None],
   "where": str}                    # "file:line (id=...)" or "file record i (id=...)"

Videos (Qwen-VL, LLaVA-OneVision), as sampled frames, one video per record: `"video"` names a
folder of frame images (taken in natural file-name order, 2 before 10) or lists the frame files;
`"fps"` (optional) is the rate they were sampled at; the conversation marks the video with
`<video>`. Video files (mp4 ...) are not decoded here: sample their frames to image files first.

`__getitem__` may raise `DataError` (missing image file); the batch iterator counts and skips it
when told to. The offline demo set of the benchmark issue plugs in by implementing `Source`.

tfds without TensorFlow: `build_tfds` converts a LLaVA JSON + image folder once into
`array_record` shards with only `Text` / `Tensor` features (images and video frames kept as
encoded bytes; `tfds.features.Image` would need TensorFlow); `TfdsSource` reads them back through
`builder.as_data_source()` (random access), videos included.
"""
from __future__ import annotations

import functools
import json
import os
import re
from typing import Protocol, runtime_checkable

import numpy as np

from mllm_tune.data.conversation import to_messages
from mllm_tune.data.errors import DataError, SkipReport, check_on_error


@runtime_checkable
class Source(Protocol):
  def __len__(self) -> int: ...

  def __getitem__(self, index: int) -> dict: ...


def _parse_lines(path: str, report: SkipReport, on_error: str) -> list[tuple[str, object]]:
  out = []
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        out.append((f"{path}:{lineno}", json.loads(line)))
      except json.JSONDecodeError as e:
        err = DataError(f"{path}:{lineno}: malformed JSON line ({e.msg} at column {e.colno})",
                        "malformed_json")
        if on_error == "raise":
          raise err from None
        report.add(err.reason, str(err))
  return out


def read_llava_json(path: str, report: SkipReport | None = None,
                    on_error: str = "raise") -> list[tuple[str, object]]:
  """Raw records of a `.json` list or a `.jsonl` file, each with its location (`where`).

  Malformed JSON raises `DataError` naming `file:line:column`; in a JSONL file a bad line is
  skipped (and counted in `report`) when `on_error="skip"`.
  """
  report = report if report is not None else SkipReport()
  if path.endswith(".jsonl"):
    out = _parse_lines(path, report, check_on_error(on_error))
  else:
    with open(path, encoding="utf-8") as f:
      text = f.read()
    try:
      data = json.loads(text)
    except json.JSONDecodeError as e:
      raise DataError(f"{path}:{e.lineno}:{e.colno}: malformed JSON: {e.msg}",
                      "malformed_json") from None
    if not isinstance(data, list):
      raise DataError(f"{path}: expected a JSON list of records, got {type(data).__name__}",
                      "malformed_json")
    out = [(f"{path} record {i}", r) for i, r in enumerate(data)]
  if not out:
    what = "no line could be read" if path.endswith(".jsonl") else "an empty JSON list"
    raise DataError(f"{path}: no records ({what}); a data set needs at least one",
                    "malformed_json", fatal=True)
  return out


def validate_record(raw: object, where: str, index: int) -> dict:
  """Check one LLaVA record's fields -> {id, conversations, image_names, where}."""
  if not isinstance(raw, dict):
    raise DataError(f"{where}: a record must be a JSON object, got {type(raw).__name__}",
                    "bad_record")
  rid = str(raw.get("id", index))
  where = f"{where} (id={rid})"
  if "conversations" not in raw:
    raise DataError(f"{where}: field 'conversations' is missing", "bad_record")
  to_messages(raw["conversations"], where)  # roles, strings, empty assistant turns
  image = raw.get("image")
  names = [] if image is None else [image] if isinstance(image, str) else image
  if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
    raise DataError(f"{where}: field 'image' must be a path or a list of paths, got {image!r}",
                    "bad_record")
  video = raw.get("video")
  frames_ok = isinstance(video, list) and video and all(isinstance(n, str) and n for n in video)
  if video is not None and not (isinstance(video, str) and video) and not frames_ok:
    raise DataError(f"{where}: field 'video' must be a folder of frames or a list of frame "
                    f"files, got {video!r}", "bad_record")
  fps = raw.get("fps")
  if fps is not None and (isinstance(fps, bool) or not isinstance(fps, (int, float))
                          or not fps > 0):
    raise DataError(f"{where}: field 'fps' must be a positive number, got {fps!r}",
                    "bad_record")
  out = {"id": rid, "conversations": raw["conversations"], "image_names": list(names),
         "where": where}
  if video is not None:
    out.update(video_names=[video if isinstance(video, str) else list(video)],
               video_fps=[None if fps is None else float(fps)])
  return out


FRAME_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")


def _read(path: str, where: str, what: str) -> bytes:
  try:
    with open(path, "rb") as f:
      return f.read()
  except FileNotFoundError:
    raise DataError(f"{where}: {what} file not found: {path}", "missing_image") from None


def _natural(name: str) -> list:
  """Sort key: digit runs compare as numbers (frame_2 before frame_10)."""
  return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", name)]


def read_frames(folder: str, name, where: str) -> list[bytes]:
  """A video's encoded frames: the image files of the folder `name` (in natural file-name
  order: `2.jpg` before `10.jpg`) or the listed files, relative to `folder`."""
  if isinstance(name, list):
    return [_read(os.path.join(folder, n), where, "video frame") for n in name]
  path = os.path.join(folder, name)
  if not os.path.isdir(path):
    raise DataError(f"{where}: video frame folder not found: {path} (videos are given as "
                    "frames: a folder of images or a list of image files)", "missing_image")
  files = sorted((f for f in os.listdir(path) if f.lower().endswith(FRAME_EXTENSIONS)),
                 key=_natural)
  if not files:
    raise DataError(f"{where}: video frame folder {path} holds no image files "
                    f"({', '.join(FRAME_EXTENSIONS)})", "missing_image")
  return [_read(os.path.join(path, f), where, "video frame") for f in files]


class LlavaJsonSource:
  """LLaVA instruction data: a `.json` list or `.jsonl` file plus the folder its images are in.

  Records are validated when the file is read (bad ones raise, or are skipped and counted in
  `self.report` with `on_error="skip"`); image files are read on access.
  """

  def __init__(self, path: str, image_folder: str | None = None, on_error: str = "raise"):
    check_on_error(on_error)
    self.path = path
    self.image_folder = image_folder or os.path.dirname(path)
    self.report = SkipReport()
    self.records = []
    for i, (where, raw) in enumerate(read_llava_json(path, self.report, on_error)):
      try:
        self.records.append(validate_record(raw, where, i))
      except DataError as e:
        if on_error == "raise":
          raise
        self.report.add(e.reason, str(e))
    if not os.path.isdir(self.image_folder or ".") and any(
        r["image_names"] or r.get("video_names") for r in self.records):
      # every image would be "missing" and skipped one by one: a wrong folder, said once
      raise DataError(f"{path}: its records name images, but the image folder "
                      f"{self.image_folder!r} is not a directory (data.image_folder, or the "
                      "eval set's image_folder)", "missing_image", fatal=True)

  def __len__(self) -> int:
    return len(self.records)

  def __getitem__(self, index: int) -> dict:
    rec = self.records[index]
    paths = [os.path.join(self.image_folder, name) for name in rec["image_names"]]
    out = {**rec, "images": [_read(p, rec["where"], "image") for p in paths],
           "image_paths": paths}
    if rec.get("video_names"):
      out["videos"] = [read_frames(self.image_folder, n, rec["where"])
                       for n in rec["video_names"]]
    return out


# ----------------------------------------------------------------------------- tfds
@functools.cache
def _builder_class():
  import tensorflow_datasets as tfds

  class MllmTuneLlava(tfds.core.GeneratorBasedBuilder):
    """LLaVA JSON + images -> array_record shards; images as encoded bytes (no TensorFlow)."""
    name = "mllm_tune_llava"
    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {"1.1.0": "videos: frames, frame counts, names and fps per video "
                              "(a data_dir built at 1.0.0 is converted again)"}

    # tfds 4.9.x locates a builder defined inside a package through `importlib_resources`,
    # which it only installs on Python < 3.9 (ModuleNotFoundError otherwise). This builder has
    # no checksums or metadata files to find, so report no code path, as for notebook builders.
    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
      return None

    def __init__(self, *, json_path: str | None = None, image_folder: str | None = None,
                 on_error: str = "raise", **kwargs):
      self._json_path, self._image_folder = json_path, image_folder
      self._on_error = check_on_error(on_error)
      self.report = SkipReport()
      super().__init__(**kwargs)

    def _info(self):
      f = tfds.features
      return tfds.core.DatasetInfo(
          builder=self, disable_shuffling=True,
          description="LLaVA-format conversations with encoded image bytes (mllm_tune).",
          features=f.FeaturesDict({
              "id": f.Text(), "where": f.Text(),
              "conversations": f.Text(),  # the turns as JSON
              "images": f.Sequence(f.Tensor(shape=(), dtype=np.object_)),
              "image_names": f.Sequence(f.Text()),
              # videos: every frame of every video in one list, split by video_frames
              "video_frames": f.Sequence(f.Tensor(shape=(), dtype=np.object_)),
              "video_lengths": f.Sequence(f.Tensor(shape=(), dtype=np.int64)),
              "video_names": f.Text(),  # JSON list (a folder name or a list of files each)
              # JSON list, null = none (tf.train.Example floats are float32: not exact)
              "video_fps": f.Text()}))

    def _split_generators(self, dl_manager):
      if self._json_path is None:
        raise ValueError("json_path is needed to build the dataset")
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      src = LlavaJsonSource(self._json_path, self._image_folder, self._on_error)
      self.report.load(src.report.as_dict(), src.report.as_dict())
      for i in range(len(src)):
        try:
          rec = src[i]
        except DataError as e:
          if self._on_error == "raise":
            raise
          self.report.add(e.reason, str(e))
          continue
        videos = rec.get("videos") or []
        yield i, {"id": rec["id"], "where": rec["where"],
                  "conversations": json.dumps(rec["conversations"]),
                  "images": rec["images"], "image_names": rec["image_names"],
                  "video_frames": [b for v in videos for b in v],
                  "video_lengths": [len(v) for v in videos],
                  "video_names": json.dumps(rec.get("video_names") or []),
                  "video_fps": json.dumps(rec.get("video_fps") or [])}

  return MllmTuneLlava


def build_tfds(json_path: str, data_dir: str, image_folder: str | None = None,
               on_error: str = "raise") -> tuple[str, SkipReport]:
  """Convert a LLaVA JSON/JSONL + image folder into tfds array_record shards under `data_dir`,
  once (a prepared dataset is reused). Returns (dataset directory, skip report)."""
  builder = _builder_class()(json_path=json_path, image_folder=image_folder, on_error=on_error,
                             data_dir=data_dir, file_format="array_record")
  builder.download_and_prepare()
  return str(builder.data_dir), builder.report


def _text(v) -> str:
  return v.decode("utf-8") if isinstance(v, bytes) else str(v)


class TfdsSource:
  """Random access to a dataset written by `build_tfds` (`builder.as_data_source()`)."""

  def __init__(self, dataset_dir: str, split: str = "train"):
    import tensorflow_datasets as tfds
    self.dataset_dir = dataset_dir
    self.data = tfds.builder_from_directory(dataset_dir).as_data_source(split=split)

  def __len__(self) -> int:
    return len(self.data)

  def __getitem__(self, index: int) -> dict:
    ex = self.data[index]
    out = {"id": _text(ex["id"]), "where": _text(ex["where"]),
           "conversations": json.loads(_text(ex["conversations"])),
           "images": [bytes(b) for b in ex["images"]],
           "image_names": [_text(n) for n in ex["image_names"]]}
    lengths = [int(n) for n in ex.get("video_lengths", ())]  # none in 1.0.0 shards
    if lengths:
      frames = [bytes(b) for b in ex["video_frames"]]
      ends = np.cumsum(lengths)
      out.update(videos=[frames[e - n:e] for n, e in zip(lengths, ends)],
                 video_names=json.loads(_text(ex["video_names"])),
                 video_fps=json.loads(_text(ex["video_fps"])))
    return out
