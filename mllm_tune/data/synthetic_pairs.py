"""Synthetic image-caption pairs with class labels, the data GIFT distils on (docs/methods.md §5.3).

Two pluggable sources with one interface (`len`, `source[i] -> Pair`, `label_names`):
  PairDirectory    generated pairs on disk (e.g. Stable Diffusion images from class prompts):
                   `captions.jsonl`, one JSON object a line, {"image": "x.png", "caption": "...",
                   "label": int or str}, image paths relative to the directory. Malformed JSON
                   or fields raise `DataError` naming `file:line`; a missing image raises when the
                   directory is opened, a corrupt one when it is read, naming the image file.
  ProceduralPairs  offline, deterministic: one coloured shape on a plain background drawn by
                   `offline_render` (the `shape` family sampler of `offline_tasks`), captioned
                   "a red circle", labelled by its (colour, shape) class (6 x 5 = 30 classes).
`make_pair_source(kind, ...)` picks one from config values; `collate_pairs` stacks a batch and
`batch_indices` draws it (a fresh permutation per epoch, a pure function of seed and step).

For an MLLM (GIFT in the trainer) `PairBatches(source, SamplePreparer, batch_size)` turns pairs
into LLaVA conversations (human: "<image>\n" + prompt, default `DEFAULT_PROMPT` or the record's
own "prompt" field; gpt: the caption) prepared by the training data's `SamplePreparer` (tokenizer,
chat template, image processor) and assembled one pair per row: `batch(step)` is a pure
function of (seed, step), so resuming needs no data state.
"""
from __future__ import annotations

import functools
import io
import os
from typing import NamedTuple, Protocol, Sequence, runtime_checkable

import numpy as np
from PIL import Image

from mllm_tune.data import images as img_lib
from mllm_tune.data.errors import DataError
from mllm_tune.data.images import decode_image, to_rgb
from mllm_tune.data.offline_render import COLORS, SHAPES, Shape
from mllm_tune.data.offline_tasks import make_example
from mllm_tune.data.anyres_batch import assemble_anyres, quarter_buckets
from mllm_tune.data.packing import BatchSpec, assemble
from mllm_tune.data.pipeline import SamplePreparer, SampleDropped
from mllm_tune.data.qwen_batch import assemble_qwen, patch_buckets, round_budget
from mllm_tune.data.qwen_images import patch_rows
from mllm_tune.data.sources import read_llava_json

CAPTIONS_FILE = "captions.jsonl"
SOURCE_KINDS = ("procedural", "directory")
DEFAULT_PROMPT = "Describe the image briefly."


class Pair(NamedTuple):
  pixels: np.ndarray  # uint8 (H, W, 3)
  caption: str
  label: int          # class id; equal ids = same class (GIFT's Y^)
  prompt: str | None = None  # the record's own instruction, if it has one


@runtime_checkable
class PairSource(Protocol):
  label_names: tuple[str, ...]

  def __len__(self) -> int: ...

  def __getitem__(self, index: int) -> Pair: ...


def _check_field(raw: dict, key: str, where: str) -> str:
  v = raw.get(key)
  if not isinstance(v, str) or not v.strip():
    raise DataError(f"{where}: field '{key}' must be a non-empty string, got {v!r}", "bad_record")
  return v


class PairDirectory:
  """Pairs listed in `<root>/captions.jsonl` (module docstring). Integer labels are kept as class
  ids (`label_names` are their decimal strings); string labels get ids in order of first
  appearance. A file mixing the two kinds raises. Optional "prompt": the instruction."""

  def __init__(self, root: str, captions: str = CAPTIONS_FILE):
    path = os.path.join(root, captions)
    if not os.path.isdir(root):
      raise DataError(f"{root}: synthetic pair directory not found", "missing_file", fatal=True)
    if not os.path.isfile(path):
      raise DataError(f"{root}: no {captions} (a synthetic pair directory lists its pairs there)",
                      "missing_file", fatal=True)
    self.root, self.path = root, path
    records, kinds = [], set()
    for where, raw in read_llava_json(path, on_error="raise"):
      if not isinstance(raw, dict):
        raise DataError(f"{where}: a record must be a JSON object, got {type(raw).__name__}",
                        "bad_record")
      image, caption = _check_field(raw, "image", where), _check_field(raw, "caption", where)
      label = raw.get("label")
      if isinstance(label, bool) or not isinstance(label, (int, str)) or label == "":
        raise DataError(f"{where}: field 'label' must be an int or a non-empty string, got "
                        f"{label!r}", "bad_record")
      kinds.add(type(label))
      if len(kinds) > 1:
        raise DataError(f"{where}: label {label!r} mixes int and string labels in one file",
                        "bad_record")
      prompt = _check_field(raw, "prompt", where) if "prompt" in raw else None
      full = os.path.join(root, image)
      if not os.path.isfile(full):
        raise DataError(f"{where}: image file not found: {full}", "missing_image")
      records.append((where, full, caption, label, prompt))
    if not records:
      raise DataError(f"{path}: no pairs listed", "bad_record", fatal=True)
    if kinds == {int}:
      ids = [r[3] for r in records]
      self.label_names = tuple(str(i) for i in range(max(ids) + 1))
      if min(ids) < 0:
        raise DataError(f"{path}: integer labels must be >= 0, got {min(ids)}", "bad_record")
    else:
      names = tuple(dict.fromkeys(r[3] for r in records))
      index = {n: i for i, n in enumerate(names)}
      ids = [index[r[3]] for r in records]
      self.label_names = names
    self.records = [(where, full, caption, i, prompt) for (where, full, caption, _, prompt), i
                    in zip(records, ids)]

  def __len__(self) -> int:
    return len(self.records)

  def image_bytes(self, index: int) -> bytes:
    where, full = self.records[index][:2]
    try:
      with open(full, "rb") as f:
        return f.read()
    except OSError as e:
      raise DataError(f"{where}: cannot read image file {full} ({e})", "missing_image") from None

  def __getitem__(self, index: int) -> Pair:
    where, full, caption, label, prompt = self.records[index]
    img = to_rgb(decode_image(self.image_bytes(index), f"{full} (listed at {where})"))
    return Pair(np.asarray(img, np.uint8), caption, int(label), prompt)


def shape_class(color: str, kind: str) -> int:
  """Class id of a (colour, shape) combination: colour-major over COLORS x SHAPES."""
  return list(COLORS).index(color) * len(SHAPES) + SHAPES.index(kind)


def shape_caption(shape: Shape) -> str:
  return f"a {shape.color} {shape.kind}"


class ProceduralPairs:
  """`num` offline pairs: pair i is `offline_tasks.make_example("shape", split, i, seed,
  image_size)` captioned "a <colour> <shape>" (train and eval share no image)."""

  label_names = tuple(f"{c} {k}" for c in COLORS for k in SHAPES)

  def __init__(self, num: int = 1000, split: str = "train", seed: int = 0,
               image_size: int = 32):
    if num < 1:
      raise ValueError(f"num={num}: a procedural pair source needs at least one pair")
    self.num, self.split, self.seed, self.image_size = num, split, seed, image_size

  def __len__(self) -> int:
    return self.num

  def __getitem__(self, index: int) -> Pair:
    if not 0 <= index < self.num:
      raise IndexError(f"pair {index} out of range [0, {self.num})")
    ex = make_example("shape", self.split, index, self.seed, self.image_size)
    (shape,) = ex.scene.objects
    return Pair(ex.pixels, shape_caption(shape), shape_class(shape.color, shape.kind))


def make_pair_source(kind: str = "procedural", path: str | None = None, num: int = 1000,
                     split: str = "train", seed: int = 0, image_size: int = 32) -> PairSource:
  """Config values -> a pair source: `procedural` (num, split, seed, image_size) or
  `directory` (path)."""
  if kind == "procedural":
    return ProceduralPairs(num, split, seed, image_size)
  if kind == "directory":
    if not path:
      raise ValueError("a 'directory' pair source needs `path`")
    return PairDirectory(path)
  raise ValueError(f"pair source kind={kind!r}: choose one of {SOURCE_KINDS}")


def collate_pairs(pairs: Sequence[Pair]) -> dict:
  """-> {pixels uint8 (B, H, W, 3), captions list[str], labels int32 (B,)}; images must share
  one size (resize them with `data.images` first otherwise)."""
  shapes = {p.pixels.shape for p in pairs}
  if len(shapes) != 1:
    raise ValueError(f"pairs have images of different shapes {sorted(shapes)}; preprocess them "
                     "to one size before stacking")
  return {"pixels": np.stack([p.pixels for p in pairs]),
          "captions": [p.caption for p in pairs],
          "labels": np.asarray([p.label for p in pairs], np.int32)}


def batch_indices(num: int, batch_size: int, seed: int, step: int) -> np.ndarray:
  """(batch_size,) indices of batch `step`: consecutive slices of per-epoch permutations
  (`default_rng([seed, epoch])`), wrapping across epochs; needs batch_size <= num."""
  if not 0 < batch_size <= num:
    raise ValueError(f"batch_size={batch_size} must be in [1, {num}] (the source's size)")
  out, pos = [], step * batch_size
  while len(out) < batch_size:
    epoch, offset = divmod(pos, num)
    perm = np.random.default_rng([seed, epoch]).permutation(num)
    take = perm[offset:offset + batch_size - len(out)]
    out.extend(take.tolist())
    pos += len(take)
  return np.asarray(out, np.int64)


# ----------------------------------------------------------------------------- MLLM batches
def llava_record(source: PairSource, index: int, prompt: str = DEFAULT_PROMPT) -> dict:
  """Pair `index` as a LLaVA record: human "<image>\n" + (the pair's prompt or `prompt`), gpt
  the caption; the image as encoded bytes (a directory's file as is, else PNG)."""
  if isinstance(source, PairDirectory):
    where, full, caption, _, own = source.records[index]
    data, name = source.image_bytes(index), full
  else:
    pair = source[index]
    where, caption, own, name = f"synthetic pair {index}", pair.caption, pair.prompt, f"#{index}"
    buf = io.BytesIO()
    Image.fromarray(pair.pixels).save(buf, format="PNG")
    data = buf.getvalue()
  return {"id": str(index), "where": where, "images": [data], "image_names": [name],
          "conversations": [{"from": "human", "value": "<image>\n" + (own or prompt)},
                            {"from": "gpt", "value": caption}]}


class PairBatches:
  """Step-indexed caption batches for an MLLM (module docstring): `batch(step)` -> input_ids,
  attention_mask, positions, segment_ids, loss_mask (b, T) with T = `prepare.max_len`,
  pixel_values (b, H, W, 3) float32, image_valid (b,); one pair per row, b = batch_size /
  shard_count rows (this host's slice of the global batch). Anyres models (LLaVA-NeXT /
  OneVision): pixel_values (C, H, W, 3) holds the rows' crops and the batch has the pack tables
  (`data.packing`); the crop budget is b times the most crops one image can yield, in quarter
  buckets. Qwen2-VL / 2.5-VL: the rows' patch rows with their vision ids, pack tables and
  (3, b, T) M-RoPE positions (`data.qwen_batch`); the patch budget is b times the most patches
  an image of the source yields (`max_image_patches`), in quarter buckets. `image_groups` G:
  the rows' image buffer splits over G data-parallel shards (Qwen: G patch blocks, each with
  b / G times the most patches; anyres: crop buckets multiples of G)."""

  def __init__(self, source: PairSource, prepare: SamplePreparer, batch_size: int, seed: int = 0,
               prompt: str = DEFAULT_PROMPT, pad_id: int = 0, shard_index: int = 0,
               shard_count: int = 1, image_groups: int = 1):
    if prepare.image_spec is None or prepare.chat.image_seq_len < 1:
      raise ValueError("caption batches need an image processor and a model with image tokens")
    if batch_size % shard_count:
      raise ValueError(f"batch_size={batch_size} is not divisible by {shard_count} hosts")
    if not 0 < batch_size <= len(source):
      raise ValueError(f"batch_size={batch_size} must be in [1, {len(source)}] (the number of "
                       "synthetic pairs)")
    self.source, self.prepare, self.seed, self.prompt = source, prepare, seed, prompt
    self.batch_size, self.shard_index, self.shard_count = batch_size, shard_index, shard_count
    rows = batch_size // shard_count
    anyres, qwen = prepare.anyres_spec, prepare.qwen_spec
    self._assemble = assemble
    if qwen is not None:
      mu, g = qwen.merge_unit, image_groups
      budget = round_budget(rows * max_image_patches(source, qwen), mu * g)
      self.spec = BatchSpec(batch_size=rows, max_len=prepare.max_len, packing=False,
                            max_images=budget, image_token_id=prepare.chat.image_token_id,
                            image_hw=prepare.image_hw, pad_id=pad_id,
                            crop_buckets=patch_buckets(budget, mu * g), merge_unit=mu,
                            window_merge=prepare.window_merge, image_groups=g)
      self._assemble = assemble_qwen
      self._normalize = functools.partial(patch_rows, spec=qwen)
      return
    if anyres is None:
      self.spec = BatchSpec(batch_size=rows, max_len=prepare.max_len, packing=False,
                            max_images=rows, image_seq_len=prepare.chat.image_seq_len,
                            image_token_id=prepare.chat.image_token_id,
                            image_hw=prepare.image_hw, pad_id=pad_id)
    else:
      budget = rows * anyres.max_crops
      self.spec = BatchSpec(batch_size=rows, max_len=prepare.max_len, packing=False,
                            max_images=budget, image_token_id=prepare.chat.image_token_id,
                            image_hw=prepare.image_hw, pad_id=pad_id,
                            crop_features=anyres.feature_side ** 2,
                            crop_buckets=quarter_buckets(budget, image_groups))
      self._assemble = assemble_anyres
    self._normalize = functools.partial(img_lib.normalize, spec=prepare.image_spec)

  def batch(self, step: int) -> dict[str, np.ndarray]:
    rows = self.spec.batch_size
    idx = batch_indices(len(self.source), self.batch_size, self.seed, step)
    samples = []
    for i in idx[self.shard_index * rows:(self.shard_index + 1) * rows]:
      try:
        samples.append([self.prepare(llava_record(self.source, int(i), self.prompt))])
      except SampleDropped as e:
        raise DataError(f"{e}: a synthetic caption must fit; raise the caption batch's seq_len",
                        "too_long", fatal=True) from None
    return self._assemble(samples, self.spec, self._normalize)


def max_image_patches(source: PairSource, spec) -> int:
  """The most Qwen2-VL patches (after `smart_resize`) an image of `source` yields: from the
  image size of a procedural source, the image files' headers of a directory, else every pair's
  image."""
  if isinstance(source, ProceduralPairs):
    sizes = [(source.image_size, source.image_size)]
  elif isinstance(source, PairDirectory):
    sizes = []
    for where, full, *_ in source.records:
      try:
        with Image.open(full) as img:
          sizes.append((img.height, img.width))
      except OSError as e:
        raise DataError(f"{where}: cannot read image file {full} ({e})", "bad_image") from None
  else:
    sizes = [source[i].pixels.shape[:2] for i in range(len(source))]
  return max(gh * gw for gh, gw in (spec.grid(hw, "synthetic pair image") for hw in set(sizes)))
