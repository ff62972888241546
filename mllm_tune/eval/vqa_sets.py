"""Benchmark sets as fixed-shape in-memory arrays, prepared once by the regular data pipeline.

Every record goes through `SamplePreparer` (chat template, assistant-only loss mask, `<image>`
expansion, CLIP preprocessing), exactly as `mllm-tune train` would see it; the benchmark then
keeps the prepared tokens and pixels in memory so tuning steps and evaluations cost no data
work. One image and one question per record, rows right-padded to the set's longest record.
Anyres models (LLaVA-NeXT / OneVision): `pixels` holds each record's crops (N, C, H, W, 3),
padded with zero crops to the set's most, and `pack` its position-aligned token tables; a batch
lays its rows' crops out one after another (fixed shapes: one compile per batch size).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from mllm_tune.data.images import ImageSpec, normalize
from mllm_tune.data.pipeline import SamplePreparer


@dataclasses.dataclass(frozen=True)
class VqaArrays:
  """A prepared set: `input_ids`, `loss_mask`, `attention_mask` (N, T) int32, `pixels` (N, H, W,
  3) uint8, `prompt_len` (N,) tokens before the answer, `answers` and `families` (N,) str."""
  name: str
  input_ids: np.ndarray
  loss_mask: np.ndarray
  attention_mask: np.ndarray
  pixels: np.ndarray
  prompt_len: np.ndarray
  answers: np.ndarray
  families: np.ndarray
  # anyres: (pack_index (N, T, K), pack_weight (N, T, K), pack_newline (N, T)), indices into
  # the row's own crops; crop_features = features per crop
  pack: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
  crop_features: int = 0

  def __len__(self) -> int:
    return len(self.input_ids)

  def images(self, idx: np.ndarray, spec: ImageSpec, width: int | None = None) -> dict:
    """The image inputs of rows `idx` (model keyword arguments), tables cut to `width`."""
    px = normalize(self.pixels[idx], spec).astype(np.float32)
    if self.pack is None:
      return {"pixel_values": px}
    index, weight, newline = (a[idx, :width] for a in self.pack)
    crops = self.pixels.shape[1]  # padding crops (no table row reads them) stay as they are
    offset = (np.arange(len(idx)) * crops * self.crop_features)[:, None, None]
    return {"pixel_values": px.reshape((-1,) + px.shape[2:]),
            "pack_index": np.where(weight != 0, index + offset, 0).astype(np.int32),
            "pack_weight": weight, "pack_newline": newline}

  def batch(self, idx: np.ndarray, spec: ImageSpec) -> dict:
    """Training batch (the trainer's field names) of rows `idx`; pixels normalized NHWC."""
    return {"input_ids": self.input_ids[idx], "loss_mask": self.loss_mask[idx],
            "attention_mask": self.attention_mask[idx], **self.images(idx, spec)}

  def prompts(self, idx: np.ndarray, spec: ImageSpec) -> tuple[np.ndarray, np.ndarray, dict]:
    """(ids, mask, image inputs) of the prompts of rows `idx`: each row cut before its answer
    (`<|im_start|>assistant\\n` is the last prompt token), right-padded."""
    width = int(self.prompt_len[idx].max())
    ids = self.input_ids[idx, :width].copy()
    mask = (np.arange(width)[None] < self.prompt_len[idx, None]).astype(np.int32)
    ids[mask == 0] = 0
    return ids, mask, self.images(idx, spec, width)


def prepare(source, preparer: SamplePreparer, num: int | None = None,
            name: str | None = None) -> VqaArrays:
  """The first `num` records of `source` (all by default) as `VqaArrays`."""
  n = len(source) if num is None else min(int(num), len(source))
  if n < 1:
    raise ValueError(f"set {name or source!r} is empty")
  rows, pixels, prompt_len, answers, families, tables = [], [], [], [], [], []
  for i in range(n):
    rec = source[i]
    sample = preparer(rec)
    if sample.table is not None:
      tables.append(sample.table)
    elif sample.num_images != 1:
      raise ValueError(f"{rec.get('where', i)}: the benchmark expects one image per record, "
                       f"got {sample.num_images}")
    t = sample.tokens
    target = np.flatnonzero(t.loss_mask)
    if not len(target):
      raise ValueError(f"{rec.get('where', i)}: no answer token after preparation")
    rows.append((t.input_ids, t.loss_mask))
    pixels.append(sample.pixels if sample.table is not None else sample.pixels[0])
    prompt_len.append(int(target[0]))
    answers.append(_answer(rec))
    families.append(rec.get("family", name or getattr(source, "name", "set")))
  width = max(len(ids) for ids, _ in rows)
  ids = np.zeros((n, width), np.int32)
  loss = np.zeros((n, width), np.int32)
  attn = np.zeros((n, width), np.int32)
  for k, (a, m) in enumerate(rows):
    ids[k, :len(a)], loss[k, :len(a)], attn[k, :len(a)] = a, m, 1
  pack, crop_features = None, 0
  if tables:
    pack, pixels, crop_features = _anyres_arrays(ids, tables, pixels, preparer)
  return VqaArrays(name or getattr(source, "name", "set"), ids, loss, attn, np.stack(pixels),
                   np.asarray(prompt_len, np.int32), np.asarray(answers), np.asarray(families),
                   pack, crop_features)


def _anyres_arrays(ids: np.ndarray, tables: list, pixels: list, preparer: SamplePreparer):
  """Position-aligned tables (N, T, K) and crops padded to the most of a record."""
  n, t = ids.shape
  k = max(tb.index.shape[1] for tb in tables)
  index, weight = np.zeros((n, t, k), np.int32), np.zeros((n, t, k), np.float32)
  newline = np.zeros((n, t), bool)
  image_id = preparer.chat.image_token_id
  for r, tb in enumerate(tables):
    pos = np.flatnonzero(ids[r] == image_id)
    kk = tb.index.shape[1]
    index[r, pos, :kk], weight[r, pos, :kk], newline[r, pos] = tb.index, tb.weight, tb.newline
  most = max(p.shape[0] for p in pixels)
  padded = [np.concatenate([p, np.zeros((most - len(p),) + p.shape[1:], p.dtype)])
            for p in pixels]
  side = preparer.anyres_spec.feature_side
  return (index, weight, newline), padded, side * side


def _answer(rec: dict) -> str:
  """The reference answer: the record's `answer` (offline sets) or its last gpt turn (LLaVA)."""
  if "answer" in rec:
    return rec["answer"]
  gpt = [t["value"] for t in rec.get("conversations", []) if t.get("from") == "gpt"]
  if not gpt:
    raise ValueError(f"{rec.get('where', 'record')}: no gpt turn to take the reference answer from")
  return str(gpt[-1]).strip()
