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
Qwen2-VL / 2.5-VL: `pixels` holds each record's uint8 patches (N, K, p, p, 3) (processor order,
zero patches after a record's own up to the set's most) and `qwen` their vision ids and the
(3, T) M-RoPE positions of the rows and prompts; a batch gives the model blocked patch rows
(B, K, C*T*p*p), one block per row (`QwenVisionTower`: attention per block, B K^2 instead of
(B K)^2), segment ids 1..B, and pack tables that number merged tokens flat (row b's image tokens
take rows b K / m^2 on).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from mllm_tune.data.images import ImageSpec, normalize
from mllm_tune.data.pipeline import SamplePreparer
from mllm_tune.data.qwen_images import patch_rows
from mllm_tune.models import qwen_vl_host


@dataclasses.dataclass(frozen=True)
class QwenRows:
  """The Qwen2-VL part of a prepared set: the M-RoPE positions (3, N, T) of the training rows
  and (3, N, P) of the generation prompts (None without prompts), 0 on padding; each record's
  vision ids over its K patch rows (`qwen_vl_host.vision_metadata`): segment (N, K) (1 on its
  patches, 0 on padding), (row, column) (N, K, 2), window (N, K) (None: Qwen2-VL, no windows);
  the image token id."""
  positions: np.ndarray
  prompt_positions: np.ndarray | None
  segment_ids: np.ndarray
  pos_hw: np.ndarray
  window_ids: np.ndarray | None
  image_token_id: int


@dataclasses.dataclass(frozen=True)
class VqaArrays:
  """A prepared set: `input_ids`, `loss_mask`, `attention_mask` (N, T) int32 (the training rows),
  `pixels` (N, H, W, 3) uint8 (anyres: crops, Qwen: patches, see the module docstring),
  `prompt_len` (N,) tokens of each generation prompt (0: prepared
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
  qwen: QwenRows | None = None

  def __len__(self) -> int:
    return len(self.input_ids)

  def images(self, idx: np.ndarray, spec: ImageSpec, width: int | None = None,
             pack: tuple | None = None) -> dict:
    """The image inputs of rows `idx` (model keyword arguments), tables (`pack`, default the
    training rows') cut to `width`."""
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

  def qwen_images(self, idx: np.ndarray, spec, ids: np.ndarray, positions: np.ndarray) -> dict:
    """The Qwen2-VL image inputs of rows `idx` whose tokens are `ids` (B, T): blocked patch rows
    (B, K, C*T*p*p), zero on padding, their vision ids (segments 1..B), pack tables (row b's
    image tokens take merged rows b K / m^2, b K / m^2 + 1, ...) and the given (3, B, T)
    `positions`."""
    q = self.qwen
    b, k = len(idx), self.pixels.shape[1]
    real = q.segment_ids[idx] > 0
    rows = patch_rows(self.pixels[idx].reshape((b * k,) + self.pixels.shape[2:]), spec)
    rows[~real.reshape(-1)] = 0.0
    is_img = ids == q.image_token_id
    first = (np.arange(b) * (k // spec.merge_unit))[:, None]
    out = {"pixel_values": rows.reshape(b, k, -1), "positions": positions,
           "vision_segment_ids": np.where(real, np.arange(1, b + 1)[:, None], 0).astype(np.int32),
           "vision_pos_hw": q.pos_hw[idx],
           "pack_index": np.where(is_img, np.cumsum(is_img, 1) - 1 + first, 0)[..., None]
           .astype(np.int32),
           "pack_weight": is_img[..., None].astype(np.float32),
           "pack_newline": np.zeros(ids.shape, bool)}
    if q.window_ids is not None:
      out["vision_window_ids"] = q.window_ids[idx]
    return out

  def batch(self, idx: np.ndarray, spec: ImageSpec) -> dict:
    """Training batch (the trainer's field names) of rows `idx`; pixels normalized NHWC (Qwen:
    patch rows)."""
    ids = self.input_ids[idx]
    images = (self.qwen_images(idx, spec, ids, self.qwen.positions[:, idx]) if self.qwen
              else self.images(idx, spec))
    return {"input_ids": ids, "loss_mask": self.loss_mask[idx],
            "attention_mask": self.attention_mask[idx], **images}

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
    if self.qwen:
      return ids, mask, self.qwen_images(idx, spec, ids,
                                         self.qwen.prompt_positions[:, idx, :width])
    return ids, mask, self.images(idx, spec, width, self.prompt_pack)


def prepare(source, preparer: SamplePreparer, num: int | None = None,
            name: str | None = None, prompts: bool = True) -> VqaArrays:
  """The first `num` records of `source` (all by default) as `VqaArrays`; `prompts=False` skips
  the generation prompts (sets only trained on)."""
  n = len(source) if num is None else min(int(num), len(source))
  if n < 1:
    raise ValueError(f"set {name or source!r} is empty")
  rows, pixels, prompt_rows, answers, families, tables, wheres = [], [], [], [], [], [], []
  qwen = preparer.qwen_spec is not None
  grids, positions, prompt_positions = [], [], []  # Qwen2-VL
  for i in range(n):
    rec = source[i]
    sample = preparer(rec)
    n_images = len(sample.image_tokens) if qwen else sample.num_images
    if sample.table is not None:
      tables.append(sample.table)
    elif n_images != 1:
      raise ValueError(f"{rec.get('where', i)}: the benchmark expects one image per record, "
                       f"got {n_images}")
    t = sample.tokens
    if not t.loss_mask.any():
      raise ValueError(f"{rec.get('where', i)}: no answer token after preparation")
    rows.append((t.input_ids, t.loss_mask))
    if prompts:
      prompt_rows.append((preparer.prompt_ids(rec, sample), None))
    if qwen:
      grids.append(sample.grids[0])
      positions.append(sample.mrope_positions)
      if prompts:
        prompt_positions.append(_mrope(prompt_rows[-1][0], sample.grids, preparer))
    pixels.append(sample.pixels if sample.table is not None or qwen else sample.pixels[0])
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
    image_id = preparer.chat.image_token_id
    pack = _pack_tables(ids, tables, image_id, wheres)
    if prompts:
      prompt_pack = _pack_tables(prompt_ids, tables, image_id, wheres, "generation prompt")
    pixels, crop_features = _pad_crops(pixels, preparer)
  qwen_rows = None
  if qwen:
    pixels = _pad_first_axis(pixels)
    qwen_rows = QwenRows(_pad_positions(positions, ids.shape[1]),
                         _pad_positions(prompt_positions, prompt_ids.shape[1]) if prompts
                         else None, *_vision_ids(grids, len(pixels[0]), preparer),
                         preparer.chat.image_token_id)
  return VqaArrays(name or getattr(source, "name", "set"), ids, loss, attn, np.stack(pixels),
                   prompt_len, np.asarray(answers), np.asarray(families),
                   pack, crop_features, prompt_ids, prompt_pack, qwen_rows)


def _mrope(ids: np.ndarray, grids: np.ndarray, preparer: SamplePreparer) -> np.ndarray:
  """(3, P) M-RoPE positions of one generation prompt (its images' `grids`)."""
  image_id = preparer.chat.image_token_id
  pos, _ = qwen_vl_host.get_rope_index(ids[None], (ids[None] == image_id).astype(np.int32),
                                       grids, preparer.qwen_spec.merge_size)
  return pos[:, 0]


def _vision_ids(grids: list, rows: int, preparer: SamplePreparer) -> tuple:
  """(segment (N, K), (row, column) (N, K, 2), window (N, K) or None) of each record's image
  over its own K = `rows` patch rows."""
  metas = [qwen_vl_host.vision_metadata(g[None], preparer.qwen_spec.merge_size,
                                        preparer.window_merge or None, rows=rows)
           for g in grids]
  stack = lambda k: np.stack([m[k] for m in metas]) if k in metas[0] else None
  return stack("vision_segment_ids"), stack("vision_pos_hw"), stack("vision_window_ids")


def _pad_positions(positions: list, width: int) -> np.ndarray:
  """(3, T_i) positions -> (3, N, width) int32, zero-padded on the right."""
  out = np.zeros((3, len(positions), width), np.int32)
  for k, p in enumerate(positions):
    out[:, k, :p.shape[1]] = p
  return out


def _pad_first_axis(arrays: list) -> list:
  """Arrays (K_i, ...) zero-padded along their first axis to the largest K_i."""
  most = max(a.shape[0] for a in arrays)
  return [np.concatenate([a, np.zeros((most - len(a),) + a.shape[1:], a.dtype)])
          for a in arrays]


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


def _pack_tables(ids: np.ndarray, tables: list, image_id: int, wheres: list,
                 what: str = "row"):
  """Position-aligned tables (N, T, K) of the rows `ids`: row r's image tokens take the rows of
  its sample's table in order (a count mismatch names the record, `wheres[r]`)."""
  n, t = ids.shape
  k = max(tb.index.shape[1] for tb in tables)
  index, weight = np.zeros((n, t, k), np.int32), np.zeros((n, t, k), np.float32)
  newline = np.zeros((n, t), bool)
  for r, tb in enumerate(tables):
    pos = np.flatnonzero(ids[r] == image_id)
    if len(pos) != len(tb.index):
      raise ValueError(f"{wheres[r]}: its {what} holds {len(pos)} image tokens but its images "
                       f"give {len(tb.index)}")
    kk = tb.index.shape[1]
    index[r, pos, :kk], weight[r, pos, :kk], newline[r, pos] = tb.index, tb.weight, tb.newline
  return index, weight, newline


def _pad_crops(pixels: list, preparer: SamplePreparer) -> tuple[list, int]:
  """Crops padded with zero crops to the most of a record; features per crop."""
  side = preparer.anyres_spec.feature_side
  return _pad_first_axis(pixels), side * side


def _answer(rec: dict) -> str:
  """The reference answer: the record's `answer` (offline sets) or its last gpt turn (LLaVA)."""
  if "answer" in rec:
    return rec["answer"]
  gpt = [t["value"] for t in rec.get("conversations", []) if t.get("from") == "gpt"]
  if not gpt:
    raise ValueError(f"{rec.get('where', 'record')}: no gpt turn to take the reference answer from")
  return str(gpt[-1]).strip()
