"""Processor-like Qwen-VL batches with videos, for the tiny models of `qwen_vl_tiny` and
`qwen3_vl_tiny`: random patch rows, grids and the placeholder runs transformers' processors
write (Qwen3-VL: one run per frame after a timestamp, as `Qwen3VLProcessor` does)."""
from __future__ import annotations

import numpy as np

from tests.helpers.hf_parity import processor_without_videos
from tests.helpers.hf_tiny import padded_batch
from tests.helpers.qwen_vl_tiny import IMAGE, VEND, VIDEO, VSTART, hf_messages, image_run

IMAGE_GRIDS = [(1, 4, 6), (1, 2, 2)]
# (t, h, w): 2 x 4 and 3 x 2 merged tokens per frame pair; t = 2 and 3 frame pairs
VIDEO_GRIDS = [(2, 4, 4), (3, 2, 4)]
SECONDS = [0.75, 1 / 3]  # second_per_grid_t per video: time steps 1.5 and 0.667 at 2 tokens/s


def video_run(grid, per_frame: bool = False) -> list[int]:
  """One video's placeholders: a single run, or (`per_frame`, Qwen3-VL) a timestamp token and a
  run per frame pair."""
  t, h, w = grid
  if not per_frame:
    return [VSTART] + [VIDEO] * (t * h * w // 4) + [VEND]
  out = []
  for k in range(t):
    out += [30 + k, 40] + [VSTART] + [VIDEO] * (h * w // 4) + [VEND]
  return out


def batch(side="right", patch_dim: int = 3 * 2 * 14 * 14, per_frame: bool = False,
          seconds=SECONDS, seed: int = 0) -> dict:
  """Row 0: an image, then a video; row 1: a video, then an image (so images-then-videos and
  text order differ); row 2: text only."""
  rows = [[1, 5] + image_run(IMAGE_GRIDS[0]) + [7] + video_run(VIDEO_GRIDS[0], per_frame) + [9],
          [1, 3] + video_run(VIDEO_GRIDS[1], per_frame) + [4] + image_run(IMAGE_GRIDS[1])
          + [6, 11],
          [1, 20, 21, 22, 23]]
  ids, mask = padded_batch(rows, side)
  rng = np.random.RandomState(seed)
  count = lambda grids: sum(t * h * w for t, h, w in grids)
  out = {"input_ids": ids, "attention_mask": mask,
         "pixel_values": rng.randn(count(IMAGE_GRIDS), patch_dim).astype(np.float32),
         "image_grid_thw": np.asarray(IMAGE_GRIDS, np.int64),
         "pixel_values_videos": rng.randn(count(VIDEO_GRIDS), patch_dim).astype(np.float32),
         "video_grid_thw": np.asarray(VIDEO_GRIDS, np.int64),
         "mm_token_type_ids": ((ids == IMAGE) + 2 * (ids == VIDEO)).astype(np.int64)}
  if seconds is not None:
    out["second_per_grid_ts"] = np.asarray(seconds, np.float32)
  return out


# ----------------------------------------------------------------------------- JSON data
def video_records(seed: int = 0) -> tuple[list[dict], dict[str, bytes]]:
  """LLaVA records with videos given as frames (written under `images/`, as the data
  pipeline's `image_folder`): a 5-frame 60x40 video in a folder, sampled at 1 fps; an image
  and a 4-frame 84x56 video listed frame by frame (default fps); text only; one image."""
  from tests.helpers.data import image_bytes
  files = {f"clipA/{k:03d}.png": image_bytes(60, 40, seed=seed + k) for k in range(5)}
  files.update({f"clipB_{k}.png": image_bytes(84, 56, seed=seed + 10 + k) for k in range(4)})
  files["still.png"] = image_bytes(70, 50, seed=seed + 20)
  files["other.png"] = image_bytes(45, 90, seed=seed + 21)
  records = [
      {"id": "v0", "video": "clipA", "fps": 1.0, "conversations": [
          {"from": "human", "value": "<video>\nwhat happens"},
          {"from": "gpt", "value": "a cat runs"}]},
      {"id": "v1", "image": "still.png", "video": [f"clipB_{k}.png" for k in range(4)],
       "conversations": [{"from": "human", "value": "first <image> then <video>?"},
                         {"from": "gpt", "value": "blue"}]},
      {"id": "t", "conversations": [{"from": "human", "value": "tell me a joke"},
                                    {"from": "gpt", "value": "two dogs"}]},
      {"id": "i", "image": "other.png", "conversations": [
          {"from": "human", "value": "<image>\nwhat is this"},
          {"from": "gpt", "value": "a red square"}]},
  ]
  return records, files


def hf_video_rows(frames, image_processor, temporal: int = 2, resize: bool = True):
  """Reference video patch rows and grid: transformers' PIL image processor on every frame
  (resize, rescale, normalize, patch order; an image row holds its frame T times), the frames
  padded to a multiple of T with the last one, each row's T slots filled from consecutive
  frames -- the (C, T, p, p) row layout of `Qwen2VLVideoProcessor.patchify`."""
  per, grid = [], None
  for f in frames:
    enc = image_processor(images=[f], return_tensors="np", do_resize=resize)
    n, width = enc["pixel_values"].shape
    p = int(round((width / 3 / temporal) ** 0.5))
    per.append(enc["pixel_values"].reshape(n, 3, temporal, p, p)[:, :, 0])
    grid = enc["image_grid_thw"][0]
  per += [per[-1]] * (-len(per) % temporal)
  t = len(per) // temporal
  x = np.stack(per).reshape(t, temporal, n, 3, p, p).transpose(0, 2, 3, 1, 4, 5)
  return x.reshape(t * n, -1).astype(np.float32), np.asarray([t, grid[1], grid[2]], np.int64)


def qwen3_video(frames, image_processor, fps: float, min_pixels: int, max_pixels: int):
  """Reference Qwen3-VL video: frames resized to transformers' Qwen3-VL video `smart_resize`
  of the whole clip (PIL bicubic), rows as `hf_video_rows` (the image processor not resizing
  again), and the text `Qwen3VLProcessor.replace_video_token` writes for it (timestamps from
  the frame indices at `fps`, a run of tokens per frame pair)."""
  import functools
  import importlib
  import types
  from transformers import Qwen3VLProcessor
  from transformers.video_utils import VideoMetadata
  resize = importlib.import_module(
      "transformers.models.qwen3_vl.video_processing_qwen3_vl").smart_resize
  h, w = resize(num_frames=len(frames), height=frames[0].height, width=frames[0].width,
                temporal_factor=2, factor=32, min_pixels=min_pixels, max_pixels=max_pixels)
  frames = [f.convert("RGB").resize((w, h), resample=3) for f in frames]
  rows, grid = hf_video_rows(frames, image_processor, resize=False)
  proc = types.SimpleNamespace(  # what replace_video_token reads of a Qwen3VLProcessor
      video_processor=types.SimpleNamespace(merge_size=2, temporal_patch_size=2),
      vision_start_token="<|vision_start|>", vision_end_token="<|vision_end|>",
      video_token="<|video_pad|>",
      _calculate_timestamps=functools.partial(Qwen3VLProcessor._calculate_timestamps, None))
  meta = VideoMetadata(total_num_frames=len(frames), fps=fps,
                       frames_indices=list(range(len(frames))))
  text = Qwen3VLProcessor.replace_video_token(
      proc, {"video_grid_thw": grid[None], "video_metadata": [meta]}, 0)
  return rows, grid, text


def encode_video_record(proc, files: dict[str, bytes], folder_frames: dict[str, list[str]],
                        with_seconds: bool, qwen3: bool = False, frame_processor=None,
                        budget: tuple[int, int] | None = None):
  """`record -> transformers-style inputs` for the records of `video_records`: the chat text of
  the processor's template on `hf_messages`, the processor's images and ids, the one
  `<|video_pad|>` expanded to the video's tokens (what `Qwen2VLProcessor` does when it has a
  video processor), `hf_video_rows` as pixel_values_videos and (`with_seconds`, Qwen2.5-VL)
  second_per_grid_ts = 2 / fps. `add_generation_prompt`: the template's generation prompt
  after the turns. `frame_processor`: the image processor that resizes frames (default the
  processor's; give one with the video budget); Qwen3-VL: `budget` (min, max pixels of the
  clip)."""
  import io
  import torch
  from PIL import Image
  open_ = lambda n: Image.open(io.BytesIO(files[n]))
  image_id, video_id = proc.tokenizer.convert_tokens_to_ids(["<|image_pad|>", "<|video_pad|>"])

  def encode(rec, add_generation_prompt: bool = False):
    text = proc.apply_chat_template(hf_messages(rec["conversations"]), tokenize=False,
                                    add_generation_prompt=add_generation_prompt)
    if qwen3 and "video" in rec:  # Qwen3VLProcessor: a timestamp and a run per frame pair
      v = rec["video"]
      frames = [open_(n) for n in (folder_frames[v] if isinstance(v, str) else v)]
      rows, grid, video_text = qwen3_video(frames, proc.image_processor, rec.get("fps", 2.0),
                                           *budget)
      text = text.replace("<|vision_start|><|video_pad|><|vision_end|>", video_text)
    names = [rec["image"]] if "image" in rec else []
    enc = processor_without_videos(proc, [open_(n) for n in names], text)
    ids = enc["input_ids"][0].numpy()
    if qwen3 and "video" in rec:
      enc.update(pixel_values_videos=torch.tensor(rows), video_grid_thw=torch.tensor(grid[None]))
    elif "video" in rec:
      v = rec["video"]
      frames = [open_(n) for n in (folder_frames[v] if isinstance(v, str) else v)]
      rows, grid = hf_video_rows(frames, frame_processor or proc.image_processor)
      at = int(np.flatnonzero(ids == video_id)[0])
      ids = np.concatenate([ids[:at], [video_id] * (int(grid.prod()) // 4), ids[at + 1:]])
      enc.update(pixel_values_videos=torch.tensor(rows), video_grid_thw=torch.tensor(grid[None]))
      if with_seconds:
        enc["second_per_grid_ts"] = torch.tensor([2 / rec.get("fps", 2.0)], dtype=torch.float32)
    enc["input_ids"] = torch.tensor(ids[None])
    enc["attention_mask"] = torch.ones_like(enc["input_ids"])
    enc["mm_token_type_ids"] = torch.tensor(((ids == image_id) + 2 * (ids == video_id))[None])
    return enc
  return encode
