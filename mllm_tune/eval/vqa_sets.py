"""Benchmark sets as fixed-shape in-memory arrays, prepared once by the regular data pipeline.

Every record goes through `SamplePreparer` (chat template, assistant-only loss mask, `<image>`
expansion, CLIP preprocessing), exactly as `mllm-tune train` would see it; the benchmark then
keeps the prepared tokens and pixels in memory so tuning steps and evaluations cost no data
work. One image and one question per record, rows right-padded to the set's longest record.

Generation prompts (`prompts`) are prepared apart from the training rows: the record's turns
before its answer rendered with the chat template's generation prompt
(`SamplePreparer.prompt_ids`), what a user sends the model at inference. They are never the
training row cut before its first answer token: that cut carries whatever the answer's
tokenization puts before it (e.g. a lone space token when the answer's first word has no
space-prefixed token), which tells the model how the answer starts.
Anyres models (LLaVA-NeXT / OneVision): `pixels` holds each record's crops (N, C, H, W, 3),
padded with zero crops to the set's most, and `pack` its position-aligned token tables; a batch
lays its rows' crops out one after another (fixed shapes: one compile per batch size).
Qwen-VL: `pixels` holds each record's patches (N, P, p, p, 3) (with a video in the set, (N, P,
T, p, p, 3): frame pairs), padded with zero patches to the set's most, `grids` its images' and
videos' patch grids and `positions` / `prompt_positions` the M-RoPE ids of its training row /
generation prompt; a batch gives the model blocked patch
rows (B, P, C*T*p*p), one block per row, with their vision ids and pack tables numbering merged
tokens flat (`QwenVisionTower`: attention per block; fixed shapes: one compile per batch size).
Records may hold any number of images.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from mllm_tune.data.images import ImageSpec, normalize
from mllm_tune.data.pipeline import SamplePreparer
from mllm_tune.data import qwen_samples
from mllm_tune.data import qwen_videos as qv
from mllm_tune.data.qwen_images import patch_rows
from mllm_tune.models import qwen_vl_host


@dataclasses.dataclass(frozen=True)
class VqaArrays:
  """A prepared set: `input_ids`, `loss_mask`, `attention_mask` (N, T) int32 (the training rows),
  `pixels` (N, H, W, 3) uint8, `prompt_len` (N,) tokens of each generation prompt (0: prepared
  without prompts), `answers` and `families` (N,) str, `prompt_ids` (N, P) int32 the generation
  prompts, right-padded with 0 (None without prompts)."""
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
  prompt_ids: np.ndarray | None = None
  prompt_pack: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # anyres: of prompt_ids
  # Qwen2-VL: (t, h, w) patch grids (N, G, 3) (zero rows after a record's images), M-RoPE ids
  # (N, 3, T) of the training rows and (N, 3, P) of the prompts, merge size m, window side
  grids: np.ndarray | None = None
  positions: np.ndarray | None = None
  prompt_positions: np.ndarray | None = None
  merge_size: int = 0
  window_merge: int = 0
  image_token_id: int = -1
  video_token_id: int = -1

  def __len__(self) -> int:
    return len(self.input_ids)

  def images(self, idx: np.ndarray, spec: ImageSpec, width: int | None = None,
             pack: tuple | None = None, prompt: bool = False) -> dict:
    """The image inputs of rows `idx` (model keyword arguments), tables (`pack`, default the
    training rows') cut to `width`; Qwen2-VL: those of the training rows, or of the generation
    prompts (`prompt`)."""
    if self.grids is not None:
      return self._qwen_images(idx, spec, width, prompt)
    px = normalize(self.pixels[idx], spec).astype(np.float32)
    pack = self.pack if pack is None else pack
    if pack is None:
      return {"pixel_values": px}
    index, weight, newline = (a[idx, :width] for a in pack)
    crops = self.pixels.shape[1]  # padding crops (no table row reads them) stay as they are
    offset = (np.arange(len(idx)) * crops * self.crop_features)[:, None, None]
    return {"pixel_values": px.reshape((-1,) + px.shape[2:]),
            "pack_index": np.where(weight != 0, index + offset, 0).astype(np.int32),
            "pack_weight": weight, "pack_newline": newline}

  def _qwen_images(self, idx: np.ndarray, spec, width: int | None, prompt: bool) -> dict:
    """Rows `idx` as blocked patch rows (B, K, C*T*p*p): block b holds row b's images' patches
    (zero after them), so the tower attends per block (`QwenVisionTower`: B K^2 instead of
    (B K)^2); their vision ids (segments numbered over the batch), pack tables numbering merged
    tokens flat (row b's image tokens take merged rows b K / m^2 on) and the rows' (3, B, width)
    M-RoPE positions."""
    b, k, m = len(idx), self.pixels.shape[1], self.merge_size
    ids = (self.prompt_ids if prompt else self.input_ids)[idx, :width]
    positions = (self.prompt_positions if prompt else self.positions)[idx, :, :width]
    px = np.zeros((b, k, spec.patch_dim), np.float32)
    metas, segments = [], 0
    for r, i in enumerate(idx):
      grids = self.grids[i][self.grids[i].any(-1)]
      n = int(grids.prod(-1).sum())
      px[r, :n] = patch_rows(self.pixels[i, :n], spec)
      meta = qwen_vl_host.vision_metadata(grids, m, self.window_merge or None, k)
      seg = meta["vision_segment_ids"]
      meta["vision_segment_ids"] = np.where(seg > 0, seg + segments, 0).astype(np.int32)
      segments += len(grids)
      metas.append(meta)
    is_img = (ids == self.image_token_id) | (ids == self.video_token_id)
    first = (np.arange(b) * (k // (m * m)))[:, None]
    return {"pixel_values": px, "positions": np.ascontiguousarray(positions.transpose(1, 0, 2)),
            **{key: np.stack([meta[key] for meta in metas]) for key in metas[0]},
            "pack_index": np.where(is_img, np.cumsum(is_img, 1) - 1 + first, 0)[..., None]
            .astype(np.int32),
            "pack_weight": is_img[..., None].astype(np.float32),
            "pack_newline": np.zeros(ids.shape, bool)}

  def batch(self, idx: np.ndarray, spec: ImageSpec) -> dict:
    """Training batch (the trainer's field names) of rows `idx`; pixels normalized NHWC."""
    return {"input_ids": self.input_ids[idx], "loss_mask": self.loss_mask[idx],
            "attention_mask": self.attention_mask[idx], **self.images(idx, spec)}

  def prompts(self, idx: np.ndarray, spec: ImageSpec) -> tuple[np.ndarray, np.ndarray, dict]:
    """(ids, mask, image inputs) of the generation prompts of rows `idx` (the turns before the
    answer + the template's generation prompt, e.g. ending `<|im_start|>assistant\\n`),
    right-padded; anyres tables are those of the prompts' image-token positions."""
    if self.prompt_ids is None:
      raise ValueError(f"set {self.name!r} was prepared without generation prompts "
                       "(prepare(..., prompts=True))")
    width = int(self.prompt_len[idx].max())
    ids = self.prompt_ids[idx, :width].copy()
    mask = (np.arange(width)[None] < self.prompt_len[idx, None]).astype(np.int32)
    ids[mask == 0] = 0
    return ids, mask, self.images(idx, spec, width, self.prompt_pack, prompt=True)


def prepare(source, preparer: SamplePreparer, num: int | None = None,
            name: str | None = None, prompts: bool = True) -> VqaArrays:
  """The first `num` records of `source` (all by default) as `VqaArrays`; `prompts=False` skips
  the generation prompts (sets only trained on)."""
  n = len(source) if num is None else min(int(num), len(source))
  if n < 1:
    raise ValueError(f"set {name or source!r} is empty")
  rows, pixels, prompt_rows, answers, families, tables, wheres = [], [], [], [], [], [], []
  qwen = []
  for i in range(n):
    rec = source[i]
    sample = preparer(rec)
    if sample.table is not None:
      tables.append(sample.table)
    elif sample.grids is not None:
      qwen.append(sample)
    elif sample.num_images != 1:
      raise ValueError(f"{rec.get('where', i)}: the benchmark expects one image per record, "
                       f"got {sample.num_images}")
    t = sample.tokens
    if not t.loss_mask.any():
      raise ValueError(f"{rec.get('where', i)}: no answer token after preparation")
    rows.append((t.input_ids, t.loss_mask))
    if prompts:
      prompt_rows.append((preparer.prompt_ids(rec, sample), None))
    whole = sample.table is not None or sample.grids is not None  # crops / patches
    pixels.append(sample.pixels if whole else sample.pixels[0])
    wheres.append(str(rec.get("where", f"record {i}")))
    answers.append(_answer(rec))
    families.append(rec.get("family", name or getattr(source, "name", "set")))
  ids, loss, attn = _pad(rows)
  prompt_ids, prompt_len = None, np.zeros((n,), np.int32)
  if prompts:
    prompt_ids, _, prompt_mask = _pad(prompt_rows)
    prompt_len = prompt_mask.sum(1).astype(np.int32)
  pack = prompt_pack = None
  crop_features = 0
  if tables:
    image_id = (preparer.chat.image_token_id, preparer.chat.video_token_id)
    pack = _pack_tables(ids, tables, image_id, wheres)
    if prompts:
      prompt_pack = _pack_tables(prompt_ids, tables, image_id, wheres, "generation prompt")
    pixels, crop_features = _pad_crops(pixels, preparer)
  extra = _qwen_fields(qwen, ids, prompt_ids, prompt_len, preparer) if qwen else {}
  if qwen:
    pixels = _pad_images(pixels, preparer.qwen_spec.temporal_patch_size
                         if any(p.ndim == 5 for p in pixels) else 0)
  return VqaArrays(name or getattr(source, "name", "set"), ids, loss, attn, np.stack(pixels),
                   prompt_len, np.asarray(answers), np.asarray(families),
                   pack, crop_features, prompt_ids, prompt_pack, **extra)


def _qwen_fields(samples: list, ids: np.ndarray, prompt_ids: np.ndarray | None,
                 prompt_len: np.ndarray, preparer: SamplePreparer) -> dict:
  """Qwen2-VL `VqaArrays` fields: grids (N, G, 3), the training rows' M-RoPE positions
  (N, 3, T) and those of the prompts (N, 3, P), computed on their own tokens (videos with
  their time steps, `qwen_samples.positions`)."""
  m, image_id = preparer.qwen_spec.merge_size, preparer.chat.image_token_id
  most = max(len(s.grids) for s in samples)
  grids = np.zeros((len(samples), most, 3), np.int64)
  positions = np.zeros((len(samples), 3, ids.shape[1]), np.int32)
  prompt_positions = None if prompt_ids is None else np.zeros(
      (len(samples), 3, prompt_ids.shape[1]), np.int32)
  for r, s in enumerate(samples):
    grids[r, :len(s.grids)] = s.grids
    positions[r, :, :s.mrope_positions.shape[1]] = s.mrope_positions
    if prompt_ids is not None:
      row = prompt_ids[r:r + 1]
      real = (np.arange(row.shape[1]) < prompt_len[r])[None].astype(np.int32)
      prompt_positions[r] = qwen_samples.positions(preparer, row[0], s, real[0])
  return dict(grids=grids, positions=positions, prompt_positions=prompt_positions,
              merge_size=m, window_merge=preparer.window_merge, image_token_id=image_id,
              video_token_id=preparer.chat.video_token_id)


def _pad_images(pixels: list, frames: int = 0) -> list:
  """Images (crops, patches) of each record padded with zero ones to the most of a record;
  with `frames` (Qwen sets with videos) every patch keeps that many frames (an image's
  repeated)."""
  if frames:
    pixels = [qv.with_frames(p, frames) for p in pixels]
  most = max(p.shape[0] for p in pixels)
  return [np.concatenate([p, np.zeros((most - len(p),) + p.shape[1:], p.dtype)])
          for p in pixels]


def _pad(rows: list) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(ids, loss mask, attention mask) (N, T) int32 of (ids, loss mask or None) rows,
  right-padded with 0 to the longest."""
  width = max(len(a) for a, _ in rows)
  ids, loss, attn = (np.zeros((len(rows), width), np.int32) for _ in range(3))
  for k, (a, m) in enumerate(rows):
    ids[k, :len(a)], attn[k, :len(a)] = a, 1
    if m is not None:
      loss[k, :len(a)] = m
  return ids, loss, attn


def _pack_tables(ids: np.ndarray, tables: list, image_id, wheres: list, what: str = "row"):
  """Position-aligned tables (N, T, K) of the rows `ids`: row r's image (and video) tokens,
  of `image_id` (an id or a tuple), take the rows of its sample's table in order (a count
  mismatch names the record, `wheres[r]`)."""
  n, t = ids.shape
  k = max(tb.index.shape[1] for tb in tables)
  index, weight = np.zeros((n, t, k), np.int32), np.zeros((n, t, k), np.float32)
  newline = np.zeros((n, t), bool)
  for r, tb in enumerate(tables):
    pos = np.flatnonzero(np.isin(ids[r], image_id))
    if len(pos) != len(tb.index):
      raise ValueError(f"{wheres[r]}: its {what} holds {len(pos)} image tokens but its images "
                       f"give {len(tb.index)}")
    kk = tb.index.shape[1]
    index[r, pos, :kk], weight[r, pos, :kk], newline[r, pos] = tb.index, tb.weight, tb.newline
  return index, weight, newline


def _pad_crops(pixels: list, preparer: SamplePreparer) -> tuple[list, int]:
  """Crops padded with zero crops to the most of a record; features per crop."""
  side = preparer.anyres_spec.feature_side
  return _pad_images(pixels), side * side


def _answer(rec: dict) -> str:
  """The reference answer: the record's `answer` (offline sets) or its last gpt turn (LLaVA)."""
  if "answer" in rec:
    return rec["answer"]
  gpt = [t["value"] for t in rec.get("conversations", []) if t.get("from") == "gpt"]
  if not gpt:
    raise ValueError(f"{rec.get('where', 'record')}: no gpt turn to take the reference answer from")
  return str(gpt[-1]).strip()
