"""Batch planning and assembly (pure): padding to bucket lengths, multimodal packing, image slots.

A batch is a dict of numpy arrays with fixed shapes for `jit` (B rows, T in `bucket_lengths`, M
image slots):
  input_ids (B, T) int32       image positions hold `image_token_id`; padding holds `pad_id`
  attention_mask (B, T) int32  1 on real tokens, 0 on padding (`segment_ids > 0`)
  segment_ids (B, T) int32     1, 2, ... for the samples packed in a row; 0 on padding
  positions (B, T) int32       0, 1, ... restarting at every segment
  loss_mask (B, T) int32       1 where token t is a target predicted from t-1 (0 at every
                               segment start, on prompts, images and padding)
  pixel_values (M, H, W, 3) float32 and image_valid (M,) int32   (only when M > 0)

Image slots: the model fills image-token runs with `pixel_values` in row-major order over the
whole batch and needs exactly M * image_seq_len image tokens. Unused slots hold dummy images
(zeros, `image_valid = 0`) whose `image_seq_len` tokens sit in the padding right after the real
tokens of some row: attention_mask 0 and segment 0 (no real token attends to them), loss 0, and
listed in flat token order, so real images keep their place. The planner only admits a sample
when the padding left can still hold whole runs for every unused slot, so this always fits.

Anyres models (LLaVA-NeXT / OneVision, `BatchSpec.crop_features > 0`, layout in
`data/anyres_batch.py`): M counts *crops*; images reach their tokens through pack tables.

Qwen2-VL / 2.5-VL (`BatchSpec.merge_unit > 0`, layout in `data/qwen_batch.py`): M counts image
*patches*; `pixel_values` (P, C*T*p*p) are the batch's patch rows (P the smallest of
`crop_buckets`, here patch counts, that holds them) with the host-built vision ids, pack tables
with one merged token per image token, and M-RoPE `positions` (3, B, T) restarting per sample.

Packing: rows are filled one after another, each with the subset of the buffered items whose
total length fills it best (subset-sum by dynamic programming; ties: more images, then older
items), within the image budget M and keeping room for the dummy runs still needed. The oldest
item carried over from an earlier batch opens the first row, so none is carried forever. What
is not placed is carried to the next batch. Without packing, buffered items take one row each,
in arrival order.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class BatchSpec:
  """Shapes and packing policy. `bucket_lengths` are the allowed row lengths T (sorted, the
  last one = `max_len`); a batch uses the smallest one its rows fit. `buffer_factor`: packing
  reads samples until the buffer holds `buffer_factor * B * max_len` tokens."""
  batch_size: int
  max_len: int
  packing: bool = True
  bucket_lengths: tuple[int, ...] = ()
  max_images: int = 0
  image_seq_len: int = 0
  image_token_id: int = -1
  image_hw: tuple[int, int] = (0, 0)
  pad_id: int = 0
  buffer_factor: float = 2.0
  crop_features: int = 0  # anyres: features per crop (> 0 turns the anyres layout on)
  crop_buckets: tuple[int, ...] = ()  # anyres / Qwen: allowed crop / patch counts (last = max)
  merge_unit: int = 0  # Qwen2-VL: patches per merged token, m^2 (> 0 turns the patch layout on)
  window_merge: int = 0  # Qwen2.5-VL: merged tokens per window side (0: no window ids)
  image_groups: int = 1  # Qwen2-VL: rows in G groups, each with max_images / G patches
  video_token_id: int = -1  # Qwen-VL: video positions take merged tokens too

  @property
  def anyres(self) -> bool:
    return self.crop_features > 0

  @property
  def qwen(self) -> bool:
    return self.merge_unit > 0

  @property
  def tables(self) -> bool:
    """Images reach their tokens through pack tables (anyres, Qwen): a variable count per
    image, no dummy image runs."""
    return self.anyres or self.qwen

  @property
  def image_unit(self) -> int:
    """Images (crops, patches) per unit of the planner's subset search: budgets above 512
    are searched in coarser units (items rounded up), so its table stays small."""
    return max(1, -(-self.max_images // 512)) if self.tables else 1

  def __post_init__(self):
    if self.anyres and self.qwen:
      raise ValueError("crop_features (anyres) and merge_unit (Qwen2-VL) exclude each other")
    if self.tables:
      self._check_anyres()
      return
    buckets = tuple(sorted(self.bucket_lengths)) or (self.max_len,)
    if buckets[-1] != self.max_len:
      raise ValueError(f"the largest bucket length ({buckets[-1]}) must equal max_len "
                       f"({self.max_len})")
    object.__setattr__(self, "bucket_lengths", buckets)
    if self.batch_size < 1 or self.max_len < 2:
      raise ValueError(f"batch_size={self.batch_size}, max_len={self.max_len}: too small")
    if self.max_images:
      if self.image_seq_len < 1 or self.image_token_id < 0 or min(self.image_hw) < 1:
        raise ValueError("max_images > 0 needs image_seq_len, image_token_id and image_hw")
      if self.pad_id == self.image_token_id:
        raise ValueError(f"pad_id {self.pad_id} must differ from image_token_id")
      limit = max_image_slots(self.batch_size, self.max_len, self.image_seq_len)
      if self.max_images > limit:
        raise ValueError(f"max_images={self.max_images} > {limit}: with image runs of "
                         f"{self.image_seq_len} tokens in {self.batch_size} rows of "
                         f"{self.max_len}, a full-length sample could find no room for the "
                         "dummy runs of the unused slots")

  def _check_anyres(self):
    buckets = tuple(sorted(self.bucket_lengths)) or (self.max_len,)
    if buckets[-1] != self.max_len:
      raise ValueError(f"the largest bucket length ({buckets[-1]}) must equal max_len "
                       f"({self.max_len})")
    object.__setattr__(self, "bucket_lengths", buckets)
    if self.batch_size < 1 or self.max_len < 2:
      raise ValueError(f"batch_size={self.batch_size}, max_len={self.max_len}: too small")
    what = "patches" if self.qwen else "crops"
    if self.max_images < 1 or self.image_token_id < 0 or min(self.image_hw) < 1:
      raise ValueError(f"an {'Qwen2-VL' if self.qwen else 'anyres'} BatchSpec needs max_images "
                       f"({what} per batch) >= 1, image_token_id and image_hw (the "
                       f"{'patch' if self.qwen else 'crop'} size)")
    crops = tuple(sorted(set(self.crop_buckets))) or (self.max_images,)
    if crops[-1] != self.max_images or crops[0] < 1:
      raise ValueError(f"crop_buckets {crops}: the largest must equal max_images "
                       f"({self.max_images}, {what} per batch), all >= 1")
    if self.qwen and any(c % self.merge_unit for c in crops):
      raise ValueError(f"patch buckets {crops} must be multiples of merge_unit "
                       f"{self.merge_unit}, so padding never shares a merge block")
    g = self.image_groups
    if g != 1 and (not self.qwen or g < 1 or self.batch_size % g
                   or any(c % (g * self.merge_unit) for c in crops)):
      raise ValueError(f"image_groups={g}: needs a Qwen2-VL spec whose batch_size "
                       f"({self.batch_size}) and patch buckets {crops} divide into {g} groups "
                       f"(buckets multiples of {g} * merge_unit)")
    object.__setattr__(self, "crop_buckets", crops)

  @property
  def capacity(self) -> int:
    return self.batch_size * self.max_len

  @property
  def group_rows(self) -> int:
    """Rows per image group (`image_groups`): rows r // group_rows share one patch block."""
    return self.batch_size // self.image_groups


def max_image_slots(batch_size: int, max_len: int, image_seq_len: int) -> int:
  """Most image slots a batch may have: with B > 1, the other B - 1 rows can hold the dummy
  runs of every unused slot next to any one sample, so every sample fits an empty batch."""
  return max(batch_size - 1, 1) * (max_len // image_seq_len)


@dataclasses.dataclass(frozen=True)
class Item:
  key: int      # the caller's handle (a source index)
  length: int
  images: int


def _slots(free: int, seq_len: int) -> int:
  return free // seq_len if seq_len else 0


def _dummy_room_ok(spec: BatchSpec, slots: int, n_images: int) -> bool:
  """Can `slots` whole padding runs hold a dummy run for every unused image slot?"""
  return not spec.max_images or spec.tables or slots >= spec.max_images - n_images


def one_per_row(items: Sequence[Item], spec: BatchSpec) -> list[list[int]]:
  """Padding layout: items in the given order, one per row, while the image budget and the
  dummy-run room allow; returns the item indices per row."""
  t, seq = spec.max_len, spec.image_seq_len
  rows: list[list[int]] = []
  n_img, slots = 0, spec.batch_size * _slots(t, seq)
  group = [0] * spec.image_groups  # images per row group
  for j, it in enumerate(items):
    if len(rows) == spec.batch_size:
      break
    g = len(rows) // spec.group_rows
    new_slots = slots - _slots(t, seq) + _slots(t - it.length, seq)
    if (n_img + it.images <= spec.max_images and _dummy_room_ok(spec, new_slots,
                                                                n_img + it.images)
        and group[g] + it.images <= spec.max_images // spec.image_groups):
      rows.append([j])
      n_img, slots, group[g] = n_img + it.images, new_slots, group[g] + it.images
  return rows + [[] for _ in range(spec.batch_size - len(rows))]


def best_subset(lengths: np.ndarray, images: np.ndarray, room: int, image_room: int,
                feasible) -> list[int]:
  """Indices of a subset with the largest total length <= room (then the most images, then the
  earliest items) using <= image_room images, among end states (images k, length s) for which
  `feasible(k, s)` holds. Subset-sum by dynamic programming over (images, length) bitsets."""
  reach = np.zeros((image_room + 1, room + 1), bool)
  reach[0, 0] = True
  before = []
  for n, k in zip(lengths, images):
    before.append(reach)
    if n <= room and k <= image_room:
      reach = reach.copy()
      reach[k:, n:] |= before[-1][:image_room + 1 - k, :room + 1 - n]
  ks, ss = np.nonzero(reach)
  for o in np.lexsort((-ks, -ss)):
    k, s = int(ks[o]), int(ss[o])
    if feasible(k, s):
      break
  else:
    return []
  chosen = []
  for j in range(len(lengths) - 1, -1, -1):
    if not before[j][k, s]:  # unreachable without item j: take it
      chosen.append(j)
      k, s = k - int(images[j]), s - int(lengths[j])
  return chosen[::-1]


def pack_rows(items: Sequence[Item], spec: BatchSpec, carried: int = 0) -> list[list[int]]:
  """Packing layout: fill rows one after another, each with the subset of the remaining items
  that fills it best (within the image budget, leaving room for the dummy runs the batch will
  still need). The oldest carried item (index 0 when `carried > 0`) opens row 0, so no item is
  carried forever. Returns the item indices per row."""
  b, t, seq, m = spec.batch_size, spec.max_len, spec.image_seq_len, spec.max_images
  rows: list[list[int]] = []
  left = list(range(len(items)))
  n_img, slots = 0, 0  # images placed, dummy runs that fit in the padding of finished rows
  m_g = m // spec.image_groups  # images per row group (Qwen `image_groups`)
  for r in range(b):
    row, room = [], t
    if r % spec.group_rows == 0:
      g_img = 0
    if r == 0 and carried:
      row, room, n_img = [0], t - items[0].length, items[0].images
      g_img = n_img
      left.remove(0)
      if n_img > m_g or not _dummy_room_ok(spec, _slots(room, seq) + (b - 1) * _slots(t, seq),
                                           n_img):
        raise ValueError(f"item {items[0].key} ({items[0].length} tokens, {items[0].images} "
                         f"images) does not fit an empty batch of {spec}")
    rest = (b - r - 1) * _slots(t, seq)

    def feasible(k, s, room=room, placed=n_img, done=slots, rest=rest):
      return _dummy_room_ok(spec, done + _slots(room - s, seq) + rest, placed + k)

    u = spec.image_unit  # images counted in units of u (rounded up: never over budget)
    image_room = (min(m - n_img, m_g - g_img) // u if spec.tables
                  else min(m - n_img, t // seq) if seq else 0)
    picked = best_subset(np.array([items[j].length for j in left], np.int64),
                         -(-np.array([items[j].images for j in left], np.int64) // u),
                         room, image_room, feasible)
    row += [left[j] for j in picked]
    taken = set(row)
    left = [j for j in left if j not in taken]
    added = sum(items[j].images for j in row[1 if r == 0 and carried else 0:])
    n_img, g_img = n_img + added, g_img + added
    slots += _slots(t - sum(items[j].length for j in row), seq)
    rows.append(row)
  return rows


def row_length(fills: Sequence[int], n_images: int, spec: BatchSpec) -> int:
  """Smallest bucket length holding every row and the dummy image runs."""
  need = 0 if spec.tables else spec.max_images - n_images
  for t in spec.bucket_lengths:
    if t >= max(fills) and (need <= 0 or sum(_slots(t - f, spec.image_seq_len)
                                             for f in fills) >= need):
      return t
  return spec.max_len


class Planner:
  """Buffers items and forms batches; unplaced items are carried (pending) in arrival order."""

  def __init__(self, spec: BatchSpec):
    self.spec = spec
    self.pending: list[Item] = []
    self.fresh: list[Item] = []

  def buffered(self) -> list[Item]:
    return self.pending + self.fresh

  def wants_more(self) -> bool:
    items = self.buffered()
    if not self.spec.packing:
      return len(items) < self.spec.batch_size
    return sum(i.length for i in items) < self.spec.buffer_factor * self.spec.capacity

  def add(self, item: Item) -> None:
    self.fresh.append(item)

  def next_batch(self) -> list[list[Item]]:
    """Rows of items for one batch ([] when nothing is buffered); the rest stays pending."""
    items = self.buffered()
    if not items:
      return []
    if self.spec.packing:
      rows = pack_rows(items, self.spec, carried=len(self.pending))
    else:
      rows = one_per_row(items, self.spec)
    placed = {j for row in rows for j in row}
    if not placed:
      raise ValueError(f"no buffered sample fits an empty batch of {self.spec}; lower "
                       "max_images or raise max_len / batch_size")
    self.pending = [it for j, it in enumerate(items) if j not in placed]
    self.fresh = []
    return [[items[j] for j in row] for row in rows]


def suggest_max_images(lengths: Sequence[int], images: Sequence[int], batch_size: int,
                       max_len: int, image_seq_len: int, packing: bool = True) -> int:
  """Image slots per batch for data with these sample lengths and image counts: what a full
  packed batch holds on average (too many slots cost padding for dummy runs, too few leave
  image samples waiting); without packing, enough for B samples with the most images. At
  least 1 and at most `max_image_slots`."""
  if not packing:
    want = batch_size * max(images, default=0)
  else:
    want = int(round(batch_size * max_len * sum(images) / max(sum(lengths), 1)))
  return min(max(want, 1), max_image_slots(batch_size, max_len, image_seq_len))


def batch_density(rows: Sequence[Sequence[Item]], spec: BatchSpec) -> tuple[int, int]:
  """(real tokens, all token slots B * T) of a planned batch."""
  fills = [sum(i.length for i in row) for row in rows]
  n_img = sum(i.images for row in rows for i in row)
  return sum(fills), spec.batch_size * row_length(fills, n_img, spec)


def assemble(rows: Sequence[Sequence], spec: BatchSpec, normalize=None) -> dict[str, np.ndarray]:
  """Rows of samples (objects with `tokens` (TokenizedConversation) and `pixels` (N, H, W, 3)
  uint8) -> the batch dict described in the module docstring. `normalize(uint8 NHWC) -> float32`
  turns pixels into model inputs (`images.normalize`). Anyres and Qwen2-VL batches are assembled
  by `anyres_batch.assemble_anyres` and `qwen_batch.assemble_qwen`."""
  if spec.qwen:
    raise ValueError("a Qwen2-VL BatchSpec: assemble with data.qwen_batch.assemble_qwen")
  if spec.anyres:
    raise ValueError("an anyres BatchSpec: assemble with data.anyres_batch.assemble_anyres")
  b, seq, m = spec.batch_size, spec.image_seq_len, spec.max_images
  fills = [sum(len(s.tokens) for s in row) for row in rows] + [0] * (b - len(rows))
  n_real = sum(int(s.pixels.shape[0]) for row in rows for s in row)
  t = row_length(fills, n_real, spec)
  ids = np.full((b, t), spec.pad_id, np.int32)
  seg, pos, loss = (np.zeros((b, t), np.int32) for _ in range(3))
  px = np.zeros((m,) + tuple(spec.image_hw) + (3,), np.uint8)
  valid = np.zeros((m,), np.int32)
  slot, dummies = 0, m - n_real
  for r in range(b):
    c = 0
    for k, s in enumerate(rows[r] if r < len(rows) else (), 1):
      n = len(s.tokens)
      ids[r, c:c + n], pos[r, c:c + n] = s.tokens.input_ids, s.tokens.positions
      loss[r, c:c + n], seg[r, c:c + n] = s.tokens.loss_mask, k
      loss[r, c] = 0  # a segment's first token is never predicted from the previous sample
      n_img = int(s.pixels.shape[0])
      px[slot:slot + n_img], valid[slot:slot + n_img] = s.pixels, 1
      slot, c = slot + n_img, c + n
    k_r = min(dummies, _slots(t - c, seq)) if dummies > 0 else 0
    ids[r, c:c + k_r * seq] = spec.image_token_id
    slot, dummies = slot + k_r, dummies - k_r
  if dummies > 0 or slot != m:
    raise AssertionError(f"image slots: placed {slot} of {m} ({dummies} dummies left)")
  batch = {"input_ids": ids, "attention_mask": (seg > 0).astype(np.int32), "positions": pos,
           "segment_ids": seg, "loss_mask": loss}
  if m:
    pixels = normalize(px) if normalize is not None else px.astype(np.float32)
    pixels[valid == 0] = 0.0
    batch.update(pixel_values=pixels, image_valid=valid)
  return batch


def crop_bucket(n: int, spec: BatchSpec) -> int:
  """Smallest allowed crop (Qwen: patch) count >= n."""
  for c in spec.crop_buckets:
    if c >= n:
      return c
  what = "patches" if spec.qwen else "crops"
  raise ValueError(f"{n} {what} exceed the batch's budget max_images={spec.max_images}")
