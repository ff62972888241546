"""Record -> training sample: tokens (chat template), length policy, decoded and resized images.

`SamplePreparer(record) -> Sample` is the per-record work of the pipeline (pure up to reading the
record). Order: tokenize (validates the turns and the `<image>` count), apply the length policy,
then decode only the images that survived truncation.

Length policy for samples longer than `max_len` tokens (`overflow`):
- "truncate" (default): cut at `max_len`, never inside an image run (the cut moves to the run's
  start and later images are dropped); counted as "truncated" and logged when the sample is
  emitted. A sample left with no target token is dropped ("too_long").
- "drop": the sample is dropped and counted ("too_long"), whatever `on_error` says.
- "fail": a `DataError` that stops the pipeline, even with `on_error="skip"`.
"""
from __future__ import annotations

import dataclasses
import threading

import numpy as np

from mllm_tune.data import images as img_lib
from mllm_tune.data.conversation import ChatTokenizer, TokenizedConversation, load_tokenizer
from mllm_tune.data.errors import DataError

OVERFLOW = ("truncate", "drop", "fail")


@dataclasses.dataclass(frozen=True)
class Sample:
  """One prepared sample: tokens, resized images uint8 (N, H, W, 3) (normalized per batch)."""
  tokens: TokenizedConversation
  pixels: np.ndarray
  id: str = ""
  where: str = ""
  truncated_from: int = 0  # original length when truncated, else 0

  @property
  def length(self) -> int:
    return len(self.tokens)

  @property
  def num_images(self) -> int:
    return int(self.pixels.shape[0])


class SampleDropped(DataError):
  """A sample removed by policy (overflow='drop'): always counted and skipped."""


def fit_length(tokens: TokenizedConversation, max_len: int, image_seq_len: int,
               overflow: str = "truncate", where: str = "record"
               ) -> tuple[TokenizedConversation, int]:
  """Apply the length policy -> (tokens of at most `max_len`, number of images kept)."""
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
  for start in tokens.image_starts:
    if start < cut < start + image_seq_len:
      cut = int(start)
  kept = int(np.sum(tokens.image_starts + image_seq_len <= cut))
  if not tokens.loss_mask[:cut].any():
    raise SampleDropped(f"{msg}: no target token left after truncation, dropped", "too_long")
  return TokenizedConversation(tokens.input_ids[:cut], tokens.loss_mask[:cut],
                               tokens.positions[:cut], tokens.image_starts[:kept]), kept


class SamplePreparer:
  """Callable record -> `Sample` for one tokenizer / template / image processor / model.

  chat: the `ChatTokenizer`; image_spec: `ImageSpec` (None for text-only models);
  max_len: longest sample in tokens; overflow: see the module docstring.
  """

  def __init__(self, chat: ChatTokenizer, image_spec: img_lib.ImageSpec | None, max_len: int,
               overflow: str = "truncate"):
    if overflow not in OVERFLOW:
      raise ValueError(f"overflow={overflow!r}: choose one of {OVERFLOW}")
    self.chat, self.image_spec, self.max_len, self.overflow = chat, image_spec, max_len, overflow
    self.image_hw = image_spec.output_hw if image_spec is not None else (0, 0)
    # HF fast tokenizers may fail when called from several threads at once ("Already
    # borrowed"); image decoding and resizing (the heavy part) run in parallel.
    self._tokenizer_lock = threading.Lock()

  @classmethod
  def from_pretrained(cls, model_dir: str, model_config, max_len: int,
                      template: str | None = None, overflow: str = "truncate",
                      aspect: str | None = None) -> SamplePreparer:
    """Tokenizer and `preprocessor_config.json` from `model_dir`; image token id, tokens per
    image and image size from `model_config` (a `LlavaConfig`)."""
    chat = ChatTokenizer(load_tokenizer(model_dir), model_config.image_token_id,
                         model_config.image_seq_len, template)
    spec = img_lib.ImageSpec.from_pretrained(model_dir, aspect)
    size = model_config.vision.image_size
    if spec.output_hw != (size, size):
      raise ValueError(f"{model_dir}: the image processor makes {spec.output_hw} images but "
                       f"the vision tower takes {size}x{size}")
    return cls(chat, spec, max_len, overflow)

  def __call__(self, record: dict) -> Sample:
    where = record.get("where", f"record (id={record.get('id')})")
    raw_images = record.get("images", [])
    with self._tokenizer_lock:
      tokens = self.chat.encode(record.get("conversations"), len(raw_images), where)
    original = len(tokens)
    tokens, kept = fit_length(tokens, self.max_len, self.chat.image_seq_len, self.overflow,
                              where)
    names = record.get("image_names") or [f"#{i}" for i in range(len(raw_images))]
    if kept and self.image_spec is None:
      raise DataError(f"{where}: has images but the pipeline has no image processor",
                      "image_count")
    crops = [img_lib.resize_and_crop(img_lib.decode_image(data, f"{where}: image {name}"),
                                     self.image_spec)
             for data, name in zip(raw_images[:kept], names)]
    h, w = self.image_hw
    pixels = np.stack(crops) if crops else np.zeros((0, h, w, 3), np.uint8)
    return Sample(tokens, pixels, str(record.get("id", "")), where,
                  original if len(tokens) < original else 0)
