"""Record -> training sample: tokens (chat template), length policy, decoded and resized images.

`SamplePreparer(record) -> Sample` is the per-record work of the pipeline (pure up to reading the
record). Order: tokenize (validates the turns and the `<image>` count), apply the length policy,
then decode only the images that survived truncation.

The length policy (`overflow`) and `Sample` live in `samples.py`; Qwen-VL records (images and
videos) are prepared in `qwen_samples.py`.
"""
from __future__ import annotations

import threading

import numpy as np

from mllm_tune.data import anyres_images as ai
from mllm_tune.data import images as img_lib
from mllm_tune.data import qwen_images as qi
from mllm_tune.data import qwen_videos as qv
from mllm_tune.data import anyres_samples, qwen_samples
from mllm_tune.models.qwen_vl_config import QwenVLConfig
from mllm_tune.data.conversation import ChatTokenizer, load_tokenizer
from mllm_tune.data.errors import DataError
from mllm_tune.data.samples import (OVERFLOW, Sample, SampleDropped, fit_length,  # noqa: F401
                                    image_labels)


class SamplePreparer:
  """Callable record -> `Sample` for one tokenizer / template / image processor / model.

  chat: the `ChatTokenizer`; image_spec: `ImageSpec` (None for text-only models);
  max_len: longest sample in tokens; overflow: see the module docstring. Qwen2.5-VL:
  `window_merge` = merged tokens per vision window side (the batches' `vision_window_ids`;
  0 for Qwen2-VL). Qwen-VL videos: `video_spec` (`qwen_videos`; None: records with
  videos are refused), `video_time_step` (`QwenVLConfig.video_time_step`) and `video_fps`, the
  frame rate of records without their own. Qwen3-VL: `video_frame_marks` (vision start, video
  pad, vision end) turns on timestamped frame runs (`qwen_samples`). OneVision takes videos
  when its `chat` has a video text (`anyres_samples.video_args`). Records with videos are
  refused for models whose `chat` has none.
  """

  def __init__(self, chat: ChatTokenizer, image_spec: img_lib.ImageSpec | None, max_len: int,
               overflow: str = "truncate", anyres_spec: ai.AnyresImageSpec | None = None,
               qwen_spec: qi.QwenImageSpec | None = None, window_merge: int = 0,
               video_spec: qi.QwenImageSpec | None = None, video_time_step: int | None = None,
               video_fps: float = qv.DEFAULT_FPS,
               video_frame_marks: tuple[str, str, str] | None = None):
    if overflow not in OVERFLOW:
      raise ValueError(f"overflow={overflow!r}: choose one of {OVERFLOW}")
    self.chat, self.image_spec, self.max_len, self.overflow = chat, image_spec, max_len, overflow
    self.anyres_spec, self.qwen_spec, self.window_merge = anyres_spec, qwen_spec, window_merge
    self.video_spec, self.video_time_step = video_spec, video_time_step
    self.video_frame_marks = video_frame_marks
    if isinstance(video_fps, bool) or not isinstance(video_fps, (int, float)) or video_fps <= 0:
      raise ValueError(f"video_fps {video_fps!r} must be a positive number")
    self.video_fps = float(video_fps)
    if qwen_spec is not None:  # patches of p x p pixels, normalized per batch
      self.image_spec = qwen_spec
      self.image_hw = (qwen_spec.patch_size,) * 2
    elif anyres_spec is not None:
      if anyres_spec.feature_side is None:
        raise ValueError("anyres_spec.feature_side is needed to count image tokens")
      self.image_spec = anyres_spec.crop  # per-crop rescale / normalize
      self.image_hw = anyres_spec.crop_hw
    else:
      self.image_hw = image_spec.output_hw if image_spec is not None else (0, 0)
    # HF fast tokenizers may fail when called from several threads at once ("Already
    # borrowed"); image decoding and resizing (the heavy part) run in parallel.
    self._tokenizer_lock = threading.Lock()

  @classmethod
  def from_pretrained(cls, model_dir: str, model_config, max_len: int,
                      template: str | None = None, overflow: str = "truncate",
                      aspect: str | None = None) -> SamplePreparer:
    """Tokenizer and `preprocessor_config.json` from `model_dir`; image token id, tokens per
    image and image size from `model_config` (a `LlavaConfig`, or a `QwenVLConfig`: see
    `qwen_preparer`)."""
    if isinstance(model_config, QwenVLConfig):
      return qwen_preparer(model_dir, model_config, max_len, template, overflow)
    tok, c = load_tokenizer(model_dir), model_config
    if c.anyres:
      spec = anyres_spec_for(model_dir, c)
      video = anyres_samples.video_args(tok, c, model_dir, spec)
      chat = ChatTokenizer(tok, c.image_token_id, c.crop_tokens, template, **video)
      return cls(chat, None, max_len, overflow, spec)
    chat = ChatTokenizer(tok, c.image_token_id, c.crop_tokens, template)
    spec = img_lib.ImageSpec.from_pretrained(model_dir, aspect)
    size = model_config.vision.image_size
    if spec.output_hw != (size, size):
      raise ValueError(f"{model_dir}: the image processor makes {spec.output_hw} images but "
                       f"the vision tower takes {size}x{size}")
    return cls(chat, spec, max_len, overflow)

  def __call__(self, record: dict) -> Sample:
    where = record.get("where", f"record (id={record.get('id')})")
    if record.get("videos") and self.chat.video_text is None:
      raise DataError(f"{where}: a video, but this model's data pipeline takes images only "
                      "(videos: Qwen2-VL / Qwen2.5-VL / Qwen3-VL, LLaVA-OneVision with a "
                      "<video> token)", "image_count")
    if self.qwen_spec is not None:
      return qwen_samples.prepare(self, record, where)
    if self.anyres_spec is not None:
      return anyres_samples.prepare(self, record, where)
    raw_images = record.get("images", [])
    with self._tokenizer_lock:
      tokens = self.chat.encode(record.get("conversations"), len(raw_images), where)
    original = len(tokens)
    tokens, kept = fit_length(tokens, self.max_len, self.chat.image_seq_len, self.overflow,
                              where)
    wheres = image_labels(record, where)
    if kept and self.image_spec is None:
      raise DataError(f"{where}: has images but the pipeline has no image processor",
                      "image_count")
    crops = [img_lib.resize_and_crop(img_lib.decode_image(data, w), self.image_spec)
             for data, w in zip(raw_images[:kept], wheres)]
    h, w = self.image_hw
    pixels = np.stack(crops) if crops else np.zeros((0, h, w, 3), np.uint8)
    return Sample(tokens, pixels, str(record.get("id", "")), where,
                  original if len(tokens) < original else 0)

  def prompt_ids(self, record: dict, sample: Sample) -> np.ndarray:
    """The generation prompt of `record` (`ChatTokenizer.encode_prompt`: the turns before its
    last assistant turn + the template's generation prompt), with the images of `sample` (its
    prepared form) expanded to the same token counts. int32 (P,). Qwen2-VL / 2.5-VL / 3-VL:
    the counts of its grids (gh * gw / m^2 per image)."""
    if self.qwen_spec is not None:
      return qwen_samples.prompt_ids(self, record, sample)
    if self.anyres_spec is not None:
      return anyres_samples.prompt_ids(self, record, sample)
    with self._tokenizer_lock:
      return self.chat.encode_prompt(record.get("conversations"), sample.num_images,
                                     sample.where)


def qwen_image_text(tokenizer, model_config: QwenVLConfig, token_id: int | None = None) -> str:
  """The text of one image in Qwen's chat templates: `<|vision_start|><|image_pad|>
  <|vision_end|>` (the tokens of the config's ids); with `token_id` = the video token id, a
  video's `<|vision_start|><|video_pad|><|vision_end|>`."""
  c = model_config
  middle = c.image_token_id if token_id is None else token_id
  return "".join(tokenizer.convert_ids_to_tokens(
      [c.vision_start_token_id, middle, c.vision_end_token_id]))


def qwen_preparer(model_dir: str, model_config: QwenVLConfig, max_len: int,
                  template: str | None = None, overflow: str = "truncate",
                  video_options: dict | None = None, video_fps: float = qv.DEFAULT_FPS,
                  **image_options) -> SamplePreparer:
  """The Qwen2-VL / 2.5-VL / 3-VL preparer of `model_dir`: its tokenizer and template (each
  `<image>` an image item the template writes as `qwen_image_text`, or that text inline for a
  string-only template: `ChatTokenizer`), its image processor (`QwenImageSpec.from_pretrained`, with
  `image_options` such as min_pixels, max_pixels, out_of_budget, max_image_tokens), checked
  against the model's vision config. Videos (`<video>`): the video processor's settings
  (`qwen_videos.video_spec_from_pretrained`, with `video_options` such as min_pixels,
  max_pixels) and `video_fps` for records without their own; Qwen3-VL's get timestamped frame
  runs."""
  tok = load_tokenizer(model_dir)
  c = model_config
  chat = ChatTokenizer(tok, c.image_token_id, 1, template, image_text=qwen_image_text(tok, c),
                       video_text=qwen_image_text(tok, c, c.video_token_id),
                       video_token_id=c.video_token_id)
  spec = qi.QwenImageSpec.from_pretrained(model_dir, **image_options)
  v = model_config.vision
  problems = [f"{name} {got} != the vision config's {want}" for name, got, want in (
      ("patch_size", spec.patch_size, v.patch_size),
      ("merge_size", spec.merge_size, v.spatial_merge_size),
      ("temporal_patch_size", spec.temporal_patch_size, v.temporal_patch_size)) if got != want]
  if problems:
    raise ValueError(f"{model_dir}: the image processor does not fit the model: "
                     + "; ".join(problems))
  video_spec = qv.video_spec_from_pretrained(model_dir, v.qwen3, **(video_options or {}))
  problems = [f"video processor {name} {got} != the image processor's {want}"
              for name in ("patch_size", "merge_size", "temporal_patch_size", "do_rescale",
                           "rescale_factor", "do_normalize", "mean", "std")
              if (got := getattr(video_spec, name)) != (want := getattr(spec, name))]
  if problems:
    raise ValueError(f"{model_dir}: " + "; ".join(problems))
  marks = None
  if v.qwen3:
    marks = tuple(tok.convert_ids_to_tokens(
        [c.vision_start_token_id, c.video_token_id, c.vision_end_token_id]))
  return SamplePreparer(chat, None, max_len, overflow, qwen_spec=spec,
                        window_merge=v.window_merge if v.windowed else 0,
                        video_spec=video_spec, video_time_step=c.video_time_step,
                        video_fps=video_fps, video_frame_marks=marks)


def anyres_spec_for(model_dir: str, model_config) -> ai.AnyresImageSpec:
  """The anyres image spec of `model_dir`, checked against the model's config."""
  c = model_config
  spec = ai.AnyresImageSpec.from_pretrained(model_dir, feature_side=c.crop_side,
                                            vision_aspect_ratio=c.vision_aspect_ratio)
  problems = []
  if spec.family != c.model_type:
    problems.append(f"it is a {spec.family} image processor, the model is {c.model_type}")
  if tuple(spec.grid_pinpoints) != tuple(c.image_grid_pinpoints):
    problems.append(f"image_grid_pinpoints {list(spec.grid_pinpoints)} != config.json's "
                    f"{list(c.image_grid_pinpoints)}")
  if spec.crop_hw != (c.vision.image_size,) * 2:
    problems.append(f"crops of {spec.crop_hw} but the vision tower takes "
                    f"{c.vision.image_size}x{c.vision.image_size}")
  if problems:
    raise ValueError(f"{model_dir}: the image processor does not fit the model: "
                     + "; ".join(problems))
  return spec
