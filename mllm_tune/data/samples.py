"""A prepared sample and the length policy (`fit_length`), shared by the record preparers
(`pipeline.SamplePreparer`, `qwen_samples`).

Length policy for samples longer than `max_len` tokens (`overflow`):
- "truncate" (default): cut at `max_len`, never inside an image run (the cut moves to the run's
  start and later images are dropped); counted as "truncated" and logged when the sample is
  emitted. A sample left with no target token is dropped ("too_long").
- "drop": the sample is dropped and counted ("too_long"), whatever `on_error` says.
- "fail": a `DataError` that stops the pipeline, even with `on_error="skip"`.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from mllm_tune.data.conversation import TokenizedConversation
from mllm_tune.data.errors import DataError
from mllm_tune.models import anyres

OVERFLOW = ("truncate", "drop", "fail")


def image_labels(record: dict, where: str) -> list[str]:
  """How errors name each of a record's images: "<where>: image <name> (<path>)", with its name
  in the record and the path a JSON source read it from (`image_paths`), or `#i` unnamed."""
  names = record.get("image_names") or [f"#{i}" for i in range(len(record.get("images", [])))]
  paths = record.get("image_paths") or names
  return [f"{where}: image {name}" + (f" ({path})" if path != name else "")
          for name, path in zip(names, paths)]


@dataclasses.dataclass(frozen=True)
class Sample:
  """One prepared sample: tokens, resized images uint8 (N, H, W, 3) (normalized per batch).
  Anyres models: `pixels` holds the crops of all the sample's images (N = crops) and `table` says
  which crop features each image token takes (`models.anyres`; indices local to these crops).
  Qwen-VL: `pixels` holds the patches of all the sample's images, uint8 (N, p, p, 3) in the
  processor's row order (N = patches, `qwen_images.to_patches`), or with a video (N, T, p, p,
  3) (`qwen_videos.video_patches`), in text order; `grids` their (items, 3) (t, h, w) grids and
  `mrope_positions` the sample's own (3, T) M-RoPE ids (`models.qwen_vl_host.get_rope_index`)."""
  tokens: TokenizedConversation
  pixels: np.ndarray
  id: str = ""
  where: str = ""
  truncated_from: int = 0  # original length when truncated, else 0
  table: anyres.PackTable | None = None
  image_tokens: tuple[int, ...] = ()  # anyres, Qwen: tokens of each kept image, in order
  grids: np.ndarray | None = None  # Qwen-VL: (t, gh, gw) of each kept image or video
  mrope_positions: np.ndarray | None = None  # Qwen2-VL: (3, T) M-RoPE positions
  video_items: tuple[bool, ...] = ()  # Qwen, anyres: which kept items (text order) are videos
  video_texts: tuple[str, ...] = ()  # Qwen3-VL: each kept video's timestamped text
  video_seconds: tuple[float, ...] = ()  # Qwen: each kept video's second_per_grid_t
  video_tokens: tuple[int, ...] = ()  # anyres (OneVision): tokens of each kept video

  @property
  def length(self) -> int:
    return len(self.tokens)

  @property
  def num_images(self) -> int:
    return int(self.pixels.shape[0])


class SampleDropped(DataError):
  """A sample removed by policy (overflow='drop'): always counted and skipped."""


def fit_length(tokens: TokenizedConversation, max_len: int, image_seq_len: int | Sequence[int],
               overflow: str = "truncate", where: str = "record"
               ) -> tuple[TokenizedConversation, int]:
  """Apply the length policy -> (tokens of at most `max_len`, number of images kept).
  `image_seq_len`: tokens per image, one number or one per image (anyres)."""
  n_img = len(tokens.image_starts)
  if len(tokens) <= max_len:
    return tokens, n_img
  msg = f"{where}: {len(tokens)} tokens > max_len {max_len}"
  if overflow == "fail":
    raise DataError(f"{msg} (overflow='fail')", "too_long", fatal=True)
  if overflow == "drop":
    raise SampleDropped(f"{msg}: dropped (overflow='drop')", "too_long")
  if overflow != "truncate":
    raise ValueError(f"overflow={overflow!r}: choose one of {OVERFLOW}")
  cut = max_len
  ends = tokens.image_starts + np.broadcast_to(np.asarray(image_seq_len, np.int64), (n_img,))
  for start, end in zip(tokens.image_starts, ends):
    if start < cut < end:
      cut = int(start)
  kept = int(np.sum(ends <= cut))
  if not tokens.loss_mask[:cut].any():
    raise SampleDropped(f"{msg}: no target token left after truncation, dropped", "too_long")
  return TokenizedConversation(tokens.input_ids[:cut], tokens.loss_mask[:cut],
                               tokens.positions[:cut], tokens.image_starts[:kept]), kept
