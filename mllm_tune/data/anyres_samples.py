"""LLaVA-NeXT / OneVision records -> samples: the anyres part of `pipeline.SamplePreparer` (its
`anyres_spec`, `chat` ...).

Image sizes decide token counts (`models.anyres.pack_table`), so images are decoded before
tokenizing; the length policy (`samples.fit_length`) sees each image and each video as one item.
Crops and token tables follow the text's order of images and videos.

OneVision videos (`video_args`; records with a "video" of sampled frames, `data/sources.py`):
each frame is resized to the tower's crop (PIL, the crop's `resample`, bicubic), as
`LlavaOnevisionVideoProcessor` resizes to its square `size`, and is a crop of its own; the video
takes frames x ceil(side / 2)^2 + 1 tokens: each frame's features bilinearly pooled to half size
per side, then one `image_newline` (`models.anyres.video_table`, transformers' `apply_pooling`).
The `<video>` placeholder is the checkpoint's video token, repeated that many times, as
`LlavaOnevisionProcessor` does. Frames are used as given (no sampling, so no fps). The video
processor config must resize to the crop size and normalize as the image processor does (one
batch normalizes crops and frames together; checked by `video_args`). transformers resizes
video frames with torchvision; PIL's bicubic rounds slightly differently.
"""
from __future__ import annotations

import numpy as np

from mllm_tune.data import anyres_images as ai
from mllm_tune.data import images as img_lib
from mllm_tune.data import qwen_videos as qv
from mllm_tune.data.errors import DataError, log
from mllm_tune.data.messages import VIDEO_PLACEHOLDER
from mllm_tune.data.samples import Sample, fit_length, image_labels
from mllm_tune.models import anyres


# `LlavaOnevisionVideoProcessor` class defaults (transformers 5)
VIDEO_DEFAULTS = dict(image_mean=img_lib.CLIP_MEAN, image_std=img_lib.CLIP_STD, resample=3,
                      do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
                      size={"height": 384, "width": 384})


def video_args(tokenizer, model_config, model_dir: str, spec: ai.AnyresImageSpec) -> dict:
  """`ChatTokenizer` video arguments of a OneVision checkpoint (its `<video>` token is the
  model's video token, as the processor's placeholder), after checking that its video
  processor config (read as transformers reads it, `qwen_videos.video_section`) resizes and
  normalizes frames as the crops are; {} (videos refused, with the reason logged) otherwise."""
  c = model_config
  if c.model_type != "llava_onevision" or c.video_token_id < 0:
    return {}
  if tokenizer.encode(VIDEO_PLACEHOLDER, add_special_tokens=False) != [c.video_token_id]:
    log.warning("%s: the tokenizer does not write %s as the model's video token %d: video "
                "records will be refused", model_dir, VIDEO_PLACEHOLDER, c.video_token_id)
    return {}
  d, where = qv.video_section(model_dir)
  d = {**VIDEO_DEFAULTS, **{k: v for k, v in d.items() if v is not None}}
  size = d["size"] if isinstance(d["size"], dict) else {}
  crop = spec.crop
  checks = (("image_mean", tuple(map(float, d["image_mean"])), tuple(crop.mean)),
            ("image_std", tuple(map(float, d["image_std"])), tuple(crop.std)),
            ("resample", int(d["resample"]), crop.resample),
            ("do_rescale", bool(d["do_rescale"]), crop.do_rescale),
            ("rescale_factor", float(d["rescale_factor"]), crop.rescale_factor),
            ("do_normalize", bool(d["do_normalize"]), crop.do_normalize),
            ("size", (size.get("height"), size.get("width")), tuple(spec.crop_hw)))
  problems = [f"{name} {got} != the crops' {want}" for name, got, want in checks
              if got != want]
  if problems:
    raise ValueError(f"{where}: the video processor treats frames unlike the image crops, "
                     "which one batch normalizes together: " + "; ".join(problems))
  return dict(video_text=VIDEO_PLACEHOLDER, video_token_id=c.video_token_id)


def decode_videos(p, record: dict, where: str) -> list[tuple[np.ndarray, anyres.PackTable]]:
  """(frames uint8 (F, S, S, 3), token table) of each video of the record."""
  spec, out = p.anyres_spec, []
  raw = record.get("videos") or []
  names = record.get("video_names") or [f"#{i}" for i in range(len(raw))]
  h, w = spec.crop_hw
  for frames, name in zip(raw, names):
    wv = f"{where}: video {name if isinstance(name, str) else name[0] + ' ...'}"
    if not frames:
      raise DataError(f"{wv}: a video without frames", "bad_image")
    px = []
    for i, data in enumerate(frames):
      img = img_lib.to_rgb(img_lib.decode_image(data, f"{wv} frame {i}"))
      if (img.height, img.width) != (h, w):
        img = img.resize((w, h), resample=spec.crop.resample)
      px.append(np.asarray(img, np.uint8))
    out.append((np.stack(px), anyres.video_table(len(px), spec.feature_side)))
  return out


def prepare(p, record: dict, where: str) -> Sample:
  """One anyres record -> `Sample` (see the module docstring)."""
  spec, raw = p.anyres_spec, record.get("images", [])
  wheres = image_labels(record, where)
  imgs = [img_lib.decode_image(data, w) for data, w in zip(raw, wheres)]
  flags = ai.anyres_flags(spec.family, [len(imgs)])
  tables = []
  for img, flag, w in zip(imgs, flags, wheres):
    hw = (img.height, img.width)
    ai.check_image_tokens(hw, spec, flag, where=w)
    tables.append(anyres.pack_table(hw, spec.num_crops(hw, flag), spec.feature_side,
                                    spec.grid_pinpoints, spec.tile, spec.family,
                                    spec.vision_aspect_ratio))
  counts = [len(t) for t in tables]
  videos = decode_videos(p, record, where)
  if videos and p.chat.video_text is None:
    raise DataError(f"{where}: a video, but this model's data pipeline takes images only",
                    "image_count")
  with p._tokenizer_lock:
    tokens = p.chat.encode(record.get("conversations"), len(raw), where, image_tokens=counts,
                           video_tokens=[len(t) for _, t in videos])
  original = len(tokens)
  is_video = (tokens.input_ids[tokens.image_starts] == p.chat.video_token_id).tolist()
  k_img = k_vid = 0
  items = []  # (kind, index, tokens) in text order
  for video in is_video:
    if video:
      items.append(("video", k_vid, len(videos[k_vid][1])))
      k_vid += 1
    else:
      items.append(("image", k_img, counts[k_img]))
      k_img += 1
  tokens, kept = fit_length(tokens, p.max_len, [n for _, _, n in items], p.overflow, where)
  crops, kept_tables = [], []
  for kind, k, _ in items[:kept]:
    if kind == "video":
      crops.append(videos[k][0])
      kept_tables.append(videos[k][1])
    else:
      crops.append(ai.anyres_crops(imgs[k], spec, flags[k], wheres[k]))
      kept_tables.append(tables[k])
  h, w = p.image_hw
  pixels = np.concatenate(crops) if crops else np.zeros((0, h, w, 3), np.uint8)
  table = anyres.concat_tables(kept_tables, [c.shape[0] for c in crops], spec.feature_side,
                               k=4 if spec.family == "llava_onevision" else 1)
  return Sample(tokens, pixels, str(record.get("id", "")), where,
                original if len(tokens) < original else 0, table,
                tuple(n for kind, _, n in items[:kept] if kind == "image"),
                video_items=tuple(kind == "video" for kind, _, _ in items[:kept]),
                video_tokens=tuple(n for kind, _, n in items[:kept] if kind == "video"))


def prompt_ids(p, record: dict, sample: Sample) -> np.ndarray:
  """`SamplePreparer.prompt_ids` for anyres samples: its images' and videos' token counts."""
  with p._tokenizer_lock:
    return p.chat.encode_prompt(record.get("conversations"), len(sample.image_tokens),
                                sample.where, list(sample.image_tokens),
                                list(sample.video_tokens))

