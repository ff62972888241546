"""Qwen-VL records -> samples: the Qwen part of `pipeline.SamplePreparer` (its `qwen_spec`,
`video_spec`, `video_frame_marks`, `chat` ...).

Image sizes (and video frame counts and sizes) decide token counts, so images and video frames
are decoded before tokenizing; the length policy (`samples.fit_length`) sees each image and each
video as one item (a Qwen3-VL video's frame runs and timestamps included), and the M-RoPE ids are
computed on the tokens kept. Patches follow the text's order of images and videos; with a video,
every patch keeps T frames (an image's repeated, as its rows are). Qwen3-VL videos
(`video_frame_marks` set) get a timestamp and a run per frame pair (`qwen_videos.video_text`).
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import numpy as np

from mllm_tune.data import images as img_lib
from mllm_tune.data import qwen_images as qi
from mllm_tune.data import qwen_videos as qv
from mllm_tune.data.errors import DataError
from mllm_tune.data.samples import Sample, fit_length, image_labels
from mllm_tune.models import qwen_vl_host


class Video(NamedTuple):
  frames: list
  seconds: float  # second_per_grid_t
  grid: tuple[int, int, int]
  where: str
  text: str | None  # Qwen3-VL: timestamps and one pad per frame pair


def decode_videos(p, record: dict, where: str) -> list[Video]:
  """The record's videos: decoded frames, seconds per frame pair, grid and (Qwen3-VL) text."""
  raw = record.get("videos") or []
  names = record.get("video_names") or [f"#{i}" for i in range(len(raw))]
  fps = record.get("video_fps") or [None] * len(raw)
  qwen3 = p.video_frame_marks is not None
  out = []
  for frames, name, rate in zip(raw, names, fps):
    w = f"{where}: video {name if isinstance(name, str) else name[0] + ' ...'}"
    decoded = [img_lib.decode_image(data, f"{w} frame {i}") for i, data in enumerate(frames)]
    if not decoded:
      raise DataError(f"{w}: a video without frames", "bad_image")
    rate = p.video_fps if rate is None else rate
    seconds = qv.second_per_grid(p.video_spec, rate, w)
    grid = qv.video_grid(len(decoded), (decoded[0].height, decoded[0].width), p.video_spec,
                         qwen3, w)
    text = None
    if qwen3:
      ts = qv.frame_timestamps(len(decoded), float(rate), p.video_spec.temporal_patch_size)
      text = qv.video_text(ts, *p.video_frame_marks)
    out.append(Video(decoded, seconds, grid, w, text))
  return out


def video_token_args(grids, texts, merge_unit: int, qwen3: bool):
  """(`video_tokens`, `video_texts`) of `ChatTokenizer.encode` for videos of these grids: one
  pad of t*gh*gw/m^2 per video, or (Qwen3-VL) t pads of gh*gw/m^2 with the texts."""
  if qwen3:
    return [int(h * w) // merge_unit for t, h, w in grids for _ in range(int(t))], list(texts)
  return [int(t * h * w) // merge_unit for t, h, w in grids], None


def prepare(p, record: dict, where: str) -> Sample:
  """One Qwen record -> `Sample` (see the module docstring)."""
  spec, raw = p.qwen_spec, record.get("images", [])
  wheres = image_labels(record, where)
  imgs = [img_lib.decode_image(data, w) for data, w in zip(raw, wheres)]
  counts = [spec.image_tokens((img.height, img.width), w) for img, w in zip(imgs, wheres)]
  videos = decode_videos(p, record, where)
  qwen3 = p.video_frame_marks is not None
  v_tokens, v_texts = video_token_args([v.grid for v in videos], [v.text for v in videos],
                                       spec.merge_unit, qwen3)
  with p._tokenizer_lock:
    tokens = p.chat.encode(record.get("conversations"), len(raw), where, image_tokens=counts,
                           video_tokens=v_tokens, video_texts=v_texts)
  original = len(tokens)
  items = _items(tokens, counts, videos, p.chat.video_token_id, spec.merge_unit, qwen3)
  run_starts = tokens.image_starts
  merged = dataclasses.replace(tokens, image_starts=np.asarray([i[2] for i in items], np.int32))
  tokens, kept = fit_length(merged, p.max_len, [i[3] for i in items], p.overflow, where)
  tokens = dataclasses.replace(tokens, image_starts=run_starts[run_starts < len(tokens)])
  done, image_grids, video_grids, seconds, texts = [], [], [], [], []
  for kind, k, _, _ in items[:kept]:
    if kind == "video":
      v = videos[k]
      px, grid = qv.video_patches(v.frames, p.video_spec, v.where, qwen3)
      video_grids.append(grid)
      seconds.append(v.seconds)
      texts.append(v.text)
    else:
      px, grid = qi.to_patches(imgs[k], spec, wheres[k])
      image_grids.append(grid)
    done.append((px, grid))
  if video_grids:  # one layout for the sample: T frames per patch
    done = [(qv.with_frames(px, spec.temporal_patch_size), g) for px, g in done]
  ps = spec.patch_size
  pixels = np.concatenate([d[0] for d in done]) if done else np.zeros((0, ps, ps, 3), np.uint8)
  sample = Sample(tokens, pixels, str(record.get("id", "")), where,
                  original if len(tokens) < original else 0,
                  image_tokens=tuple(int(i[3]) for i in items[:kept] if i[0] == "image"),
                  grids=np.asarray([d[1] for d in done], np.int64).reshape(-1, 3),
                  video_items=tuple(i[0] == "video" for i in items[:kept]),
                  video_texts=tuple(texts) if qwen3 else (), video_seconds=tuple(seconds))
  try:
    pos = positions(p, tokens.input_ids, sample)
  except ValueError as e:  # e.g. two images with no text between their token runs
    raise DataError(f"{where}: conversations: the image / video tokens do not form one run "
                    f"per image or video ({e})", "image_count") from None
  return dataclasses.replace(sample, mrope_positions=pos)


def _items(tokens, counts, videos, video_id: int, merge_unit: int, qwen3: bool) -> list:
  """(kind, index, first token, tokens spanned) of each image and video in text order; a
  Qwen3-VL video spans its first frame run to the end of its last."""
  starts, ids = tokens.image_starts, tokens.input_ids
  items, r, k_img, k_vid = [], 0, 0, 0
  while r < len(starts):
    if ids[starts[r]] != video_id:
      items.append(("image", k_img, int(starts[r]), int(counts[k_img])))
      k_img, r = k_img + 1, r + 1
      continue
    t, h, w = videos[k_vid].grid
    runs = t if qwen3 else 1
    per_run = (h * w if qwen3 else t * h * w) // merge_unit
    end = int(starts[r + runs - 1]) + per_run
    items.append(("video", k_vid, int(starts[r]), end - int(starts[r])))
    k_vid, r = k_vid + 1, r + runs
  return items


def positions(p, ids_T: np.ndarray, sample: Sample, mask_T: np.ndarray | None = None
              ) -> np.ndarray:
  """(3, T) M-RoPE ids of token row `ids_T` holding `sample`'s images and videos (e.g. its
  generation prompt), with the sample's grids, video kinds and time steps."""
  ids = np.asarray(ids_T)[None]
  types = qwen_vl_host.mm_token_types(ids, p.chat.image_token_id, p.chat.video_token_id)
  kinds = np.asarray(sample.video_items or (False,) * len(sample.grids), bool)
  grids = np.asarray(sample.grids, np.int64).reshape(-1, 3)
  return qwen_vl_host.get_rope_index(
      ids, types, grids[~kinds], p.qwen_spec.merge_size,
      None if mask_T is None else np.asarray(mask_T)[None], video_grid_thw=grids[kinds],
      second_per_grid_ts=sample.video_seconds or None, tokens_per_second=p.video_time_step,
      split_video_frames=p.video_frame_marks is not None)[0][:, 0]


def prompt_ids(p, record: dict, sample: Sample) -> np.ndarray:
  """`SamplePreparer.prompt_ids` for Qwen samples: the counts of its grids, its videos'."""
  mu = p.qwen_spec.merge_unit
  kinds = sample.video_items or (False,) * len(sample.grids)
  images = [int(np.prod(g)) // mu for g, v in zip(sample.grids, kinds) if not v]
  v_tokens, v_texts = video_token_args([g for g, v in zip(sample.grids, kinds) if v],
                                       sample.video_texts, mu,
                                       p.video_frame_marks is not None)
  with p._tokenizer_lock:
    return p.chat.encode_prompt(record.get("conversations"), len(images), sample.where, images,
                                v_tokens, v_texts)
