"""Anyres geometry (LLaVA-NeXT / LLaVA-OneVision) and the per-image token table, numpy on the host.

An anyres image becomes `1 + gh * gw` crops of S x S pixels: a base crop (the whole image squashed
to S x S) and a gh x gw grid cut from the image resized into the best "pinpoint" resolution.
The vision tower turns each crop into s x s features (s = S / patch). The LLM sees, per image:

    base (s*s tokens) + the grid's feature map, unpadded (the rows or columns that only covered
    the letterbox removed), for OneVision bilinearly shrunk when it exceeds `anyres_max_N` crops,
    with an `image_newline` token ending every map row

(transformers' `pack_image_features`). A single-crop image (OneVision multi-image samples) is its
s*s features plus one newline.

Everything data dependent is decided here, on the host, as a `PackTable`: for each image token,
K source rows in the image's flat crop features (crop c, feature y, x -> row `c*s*s + y*s + x`)
with weights, and a newline flag. In `jit` the model then computes token = sum_k w_k *
feats[index_k] (+ image_newline where flagged): one static-shape gather, exact and differentiable.
K is 1 for LLaVA-NeXT (a plain selection) and 4 for OneVision (the taps of a bilinear resize with
`align_corners=False` and no antialiasing, as `torch.nn.functional.interpolate(mode="bilinear")`).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import numpy as np

ANYRES_FAMILIES = ("llava_next", "llava_onevision")


def select_best_resolution(hw: Sequence[int], pinpoints: Sequence[Sequence[int]]) -> tuple[int, int]:
  """The (height, width) pinpoint that keeps the most of an (H, W) image's resolution when the
  image is fitted into it (ties: the least wasted area, then the earlier pinpoint)."""
  h0, w0 = int(hw[0]), int(hw[1])
  best, best_eff, best_waste = None, 0, math.inf
  for ph, pw in pinpoints:
    scale = min(pw / w0, ph / h0)
    eff = min(int(w0 * scale) * int(h0 * scale), w0 * h0)
    waste = pw * ph - eff
    if eff > best_eff or (eff == best_eff and waste < best_waste):
      best, best_eff, best_waste = (int(ph), int(pw)), eff, waste
  if best is None:
    raise ValueError(f"no grid pinpoint fits an image of {h0}x{w0} (pinpoints {pinpoints})")
  return best


def grid_shape(hw: Sequence[int], pinpoints, crop: int) -> tuple[int, int]:
  """(rows, columns) of the crop grid of an (H, W) image."""
  ph, pw = select_best_resolution(hw, pinpoints)
  return -(-ph // crop), -(-pw // crop)


def num_crops(hw: Sequence[int], pinpoints, crop: int, anyres: bool = True) -> int:
  """Crops an image yields: 1 (base) + the grid, or 1 without anyres (OneVision multi-image)."""
  if not anyres:
    return 1
  gh, gw = grid_shape(hw, pinpoints, crop)
  return 1 + gh * gw


def max_crops_from_aspect(vision_aspect_ratio: str) -> int:
  """`anyres_max_9` -> 9 (OneVision's cap on the grid's feature area, in crops)."""
  if not vision_aspect_ratio.startswith("anyres_max_"):
    raise ValueError(f"vision_aspect_ratio {vision_aspect_ratio!r} is not supported "
                     "(expected 'anyres_max_<N>')")
  return int(vision_aspect_ratio[len("anyres_max_"):])


def unpad_box(map_hw: tuple[int, int], orig_hw: Sequence[int]) -> tuple[int, int, int, int]:
  """(top, bottom, left, right) of the part of a (H', W') feature map that covers the image
  rather than the letterbox padding (transformers' `unpad_image`)."""
  mh, mw = map_hw
  h0, w0 = int(orig_hw[0]), int(orig_hw[1])
  if w0 / h0 > mw / mh:
    new_h = int(round(h0 * (mw / w0), 7))
    pad = (mh - new_h) // 2
    return pad, mh - pad, 0, mw
  new_w = int(round(w0 * (mh / h0), 7))
  pad = (mw - new_w) // 2
  return 0, mh, pad, mw - pad


def bilinear_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """1-D taps of a bilinear resize n_in -> n_out with `align_corners=False`, no antialiasing:
  (i0, i1, weight of i1) per output position, computed in float32 as PyTorch's CPU kernel does
  (so the weights are the same numbers, not only close)."""
  f32 = np.float32
  scale = f32(n_in) / f32(n_out)
  src = np.maximum(scale * (np.arange(n_out, dtype=f32) + f32(0.5)) - f32(0.5), f32(0))
  i0 = src.astype(np.int64)
  i1 = np.minimum(i0 + 1, n_in - 1)
  return i0, i1, src - i0.astype(f32)


def bilinear_grid(ys: np.ndarray, xs: np.ndarray, out_h: int, out_w: int, row
                  ) -> tuple[np.ndarray, np.ndarray]:
  """The 4 taps of a bilinear resize of the feature grid at rows `ys` x columns `xs` to
  (out_h, out_w): (flat feature rows (out_h, out_w, 4) = `row(y, x)`, weights (out_h, out_w,
  4)), in the order (y0, x0), (y0, x1), (y1, x0), (y1, x1)."""
  y0, y1, ly = bilinear_taps(len(ys), out_h)
  x0, x1, lx = bilinear_taps(len(xs), out_w)
  yy = [ys[y0][:, None], ys[y0][:, None], ys[y1][:, None], ys[y1][:, None]]
  xx = [xs[x0][None], xs[x1][None], xs[x0][None], xs[x1][None]]
  wy = [1 - ly, 1 - ly, ly, ly]
  wx = [1 - lx, lx, 1 - lx, lx]
  return (np.stack([row(a, b) for a, b in zip(yy, xx)], -1),
          np.stack([a[:, None] * b[None] for a, b in zip(wy, wx)], -1))


class PackTable(NamedTuple):
  """Per image token: `index` (N, K) rows of the image's flat crop features, `weight` (N, K)
  float32, `newline` (N,) bool (the token is `image_newline`; its index/weight are 0)."""
  index: np.ndarray
  weight: np.ndarray
  newline: np.ndarray

  def __len__(self) -> int:
    return int(self.newline.shape[0])


def _table(index_NK, weight_NK, newline_N) -> PackTable:
  return PackTable(np.asarray(index_NK, np.int32), np.asarray(weight_NK, np.float32),
                   np.asarray(newline_N, bool))


def pack_table(hw: Sequence[int], n_crops: int, side: int, pinpoints, crop: int,
               family: str, vision_aspect_ratio: str = "anyres_max_9") -> PackTable:
  """The token table of one image of original size `hw` = (H, W) split into `n_crops` crops of
  `crop` pixels, each giving `side` x `side` features; see the module docstring."""
  if family not in ANYRES_FAMILIES:
    raise ValueError(f"family {family!r}: expected one of {ANYRES_FAMILIES}")
  k = 4 if family == "llava_onevision" else 1
  s2 = side * side
  base_idx = np.zeros((s2, k), np.int64)
  base_idx[:, 0] = np.arange(s2)
  base_w = np.zeros((s2, k))
  base_w[:, 0] = 1.0
  if n_crops == 1:
    idx = np.concatenate([base_idx, np.zeros((1, k), np.int64)])
    w = np.concatenate([base_w, np.zeros((1, k))])
    return _table(idx, w, np.arange(s2 + 1) == s2)
  gh, gw = grid_shape(hw, pinpoints, crop)
  if n_crops != 1 + gh * gw:
    raise ValueError(f"image of {hw[0]}x{hw[1]}: {n_crops} crops given, its {gh}x{gw} anyres "
                     f"grid needs {1 + gh * gw}")
  mh, mw = gh * side, gw * side
  top, bottom, left, right = unpad_box((mh, mw), hw)
  ys, xs = np.arange(top, bottom), np.arange(left, right)

  def row(y, x):  # map position -> flat feature row (crop 0 is the base)
    return (1 + (y // side) * gw + (x // side)) * s2 + (y % side) * side + (x % side)

  h, w = len(ys), len(xs)
  if family == "llava_onevision":
    ratio = math.sqrt(h * w / (max_crops_from_aspect(vision_aspect_ratio) * s2))
  if family == "llava_onevision" and ratio > 1.1:
    oh, ow = int(h // ratio), int(w // ratio)
    grid_idx, grid_w = bilinear_grid(ys, xs, oh, ow, row)  # (oh, ow, 4) each
    h, w = oh, ow
  else:
    grid_idx = np.zeros((h, w, k), np.int64)
    grid_idx[..., 0] = row(ys[:, None], xs[None])
    grid_w = np.zeros((h, w, k))
    grid_w[..., 0] = 1.0
  # a newline column ends every row
  grid_idx = np.concatenate([grid_idx, np.zeros((h, 1, k), np.int64)], 1).reshape(-1, k)
  grid_w = np.concatenate([grid_w, np.zeros((h, 1, k))], 1).reshape(-1, k)
  nl = np.zeros((h, w + 1), bool)
  nl[:, -1] = True
  return _table(np.concatenate([base_idx, grid_idx]), np.concatenate([base_w, grid_w]),
                np.concatenate([np.zeros(s2, bool), nl.reshape(-1)]))


def video_frame_side(side: int) -> int:
  """OneVision: features per side of a pooled video frame, ceil(side / 2)."""
  return -(-side // 2)


def video_tokens(n_frames: int, side: int) -> int:
  """OneVision: tokens of a video of `n_frames` frames: frames x ceil(side / 2)^2 + 1."""
  return n_frames * video_frame_side(side) ** 2 + 1


def video_table(n_frames: int, side: int) -> PackTable:
  """The token table of one OneVision video of `n_frames` frames (each a crop of `side` x
  `side` features): per frame, its features bilinearly shrunk to ceil(side / 2) per side (4
  taps, transformers' `apply_pooling`), frame after frame, then one `image_newline`."""
  out = video_frame_side(side)
  grid = np.arange(side)
  frame_idx, frame_w = bilinear_grid(grid, grid, out, out, lambda y, x: y * side + x)
  frame_idx, frame_w = frame_idx.reshape(-1, 4), frame_w.reshape(-1, 4)
  idx = np.concatenate([frame_idx + f * side * side for f in range(n_frames)]
                       + [np.zeros((1, 4), np.int64)])
  w = np.concatenate([frame_w] * n_frames + [np.zeros((1, 4))])
  return _table(idx, w, np.arange(len(idx)) == len(idx) - 1)


def concat_tables(tables: Sequence[PackTable], crops: Sequence[int], side: int,
                  rows: int | None = None, k: int | None = None) -> PackTable:
  """The tables of several images, in order, for their crops laid out one after another (image
  i's crop features start at row `sum(crops[:i]) * side**2`), padded to `rows` tokens with
  all-zero rows (weight 0, no newline: not an image token)."""
  s2 = side * side
  if k is None:
    k = tables[0].index.shape[1] if tables else 1
  offsets = np.concatenate([[0], np.cumsum(crops)[:-1]]).astype(np.int64) * s2
  idx = [t.index.astype(np.int64) + off for t, off in zip(tables, offsets)]
  n = sum(len(t) for t in tables)
  rows = n if rows is None else rows
  if n > rows:
    raise ValueError(f"{n} image tokens do not fit a table of {rows} rows")
  out_i = np.zeros((rows, k), np.int32)
  out_w = np.zeros((rows, k), np.float32)
  out_nl = np.zeros((rows,), bool)
  if tables:
    out_i[:n] = np.concatenate(idx) if idx else 0
    out_w[:n] = np.concatenate([t.weight for t in tables])
    out_nl[:n] = np.concatenate([t.newline for t in tables])
  return PackTable(out_i, out_w, out_nl)
