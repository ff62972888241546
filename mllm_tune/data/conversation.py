"""LLaVA-format conversations -> token ids, loss masks, positions and image slots.

A LLaVA record's `conversations` is a list of `{"from": "human" | "gpt" | "system", "value": str}`
turns; `<image>` placeholders sit inline in the text. We render the whole conversation with the
model's chat template through transformers (`apply_chat_template(tokenize=False)`): the
tokenizer's own `chat_template`, or a built-in one when it has none (`"vicuna_v1"`, LLaVA-1.5's
`conv_vicuna_v1`; `"chatml"`, Qwen2's template), or any Jinja string. The rendered text is
tokenized in one call (no special tokens added: templates write their own BOS), exactly as
`apply_chat_template(tokenize=True)` does, so the ids are the tokenizer's ids bit for bit.

Templates that expect list-style contents (`{"type": "image"}`, `{"type": "text", ...}` items:
llava-hf, LLaVA-OneVision) get them (`templates.content_style` detects the style once per
template; `templates.to_list_contents` converts); a template that renders neither style is
refused naming it, why, and what to set instead (`data.template`).

Generation prompts (`encode_prompt`): the conversation before the last assistant turn rendered
with the template's generation prompt (`add_generation_prompt=True`), i.e. what a user sends at
inference; it never depends on how the answer tokenizes.

Loss mask (which tokens are *targets*): the assistant turns, i.e. each assistant message's
content plus the end-of-turn special token that directly follows it (`</s>`, `<|im_end|>`, ...).
- Templates with `{% generation %}` blocks: transformers' own `assistant_masks` are used.
- Other templates: the span of assistant turn i starts where its content starts in the rendering
  (found after `render(messages[:i], add_generation_prompt=True)`, which must be a prefix of the
  full rendering) and ends after the special token that follows the content (whitespace allowed
  in between). A token is marked when it overlaps a span, the rule transformers applies to
  generation spans, so both give the same mask (tested).
`loss_mask[t] = 1` means token t is predicted from position t-1 (see `mllm_tune.data.targets`);
`loss_mask[0]` is always 0 and image tokens are never targets.

Images: the placeholder (`<image>`) must be one token of the tokenizer (LLaVA tokenizers have it;
otherwise it is added as a special token). Each placeholder id becomes `image_seq_len` copies of
the model's `image_token_id`, as transformers' `LlavaProcessor` does; or, with per-image counts
(`encode(..., image_tokens=[n_0, n_1, ...])`, anyres models whose count depends on the image
size), placeholder i becomes n_i copies, as `LlavaNextProcessor` / `LlavaOnevisionProcessor` do.
Checkpoints whose chat template writes images in their own form (Qwen2-VL / 2.5-VL / 3-VL:
`<|vision_start|><|image_pad|><|vision_end|>`, `image_text=`) get list-style contents when their
template renders an image item as that form (Qwen's own templates do: the messages transformers'
processor takes, the whitespace beside `<image>` dropped); a string-only template (e.g.
`"chatml"`) gets each `<image>` of the text replaced by the form. Its one image token
(`<|image_pad|>`, the model's `image_token_id`) is then repeated n_i times, as
`Qwen2VLProcessor` repeats `<|image_pad|>`. Videos (Qwen-VL, `video_text=`): each `<video>`
placeholder becomes a video item (list style) or the video text
`<|vision_start|><|video_pad|><|vision_end|>` (string style), its pad repeated per the video's
token count; Qwen3-VL's rendered video text is then replaced by its per-video text (a timestamp
and a pad per frame pair, `encode(..., video_texts=)`), as `Qwen3VLProcessor` does.
image_starts list the image and video runs in text order.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

import numpy as np

from mllm_tune.data.errors import DataError, log
from mllm_tune.data.messages import (IMAGE_PLACEHOLDER, ROLES, VIDEO_PLACEHOLDER,  # noqa: F401
                                     count_placeholders, overlap_mask, to_messages)
from mllm_tune.data.templates import (BUILTIN_TEMPLATES, CHATML, FIX, GENERATION_TAG,  # noqa: F401
                                      VICUNA_SYSTEM, VICUNA_V1, content_style, load_tokenizer,
                                      resolve_template, to_list_contents)


@dataclasses.dataclass(frozen=True)
class TokenizedConversation:
  """One sample's tokens. All arrays int32; T = len(input_ids); N = number of images.

  input_ids (T,): image runs hold `image_token_id` (image_seq_len, or the given per-image
    count, per image), video runs `video_token_id` (the given per-video count);
  loss_mask (T,): 1 where token t is a target (assistant content + its end token);
  positions (T,): 0..T-1; image_starts (N,): index of the first token of each image or video
    run, in text order (N = images + videos).
  """
  input_ids: np.ndarray
  loss_mask: np.ndarray
  positions: np.ndarray
  image_starts: np.ndarray

  def __len__(self) -> int:
    return int(self.input_ids.shape[0])


class ChatTokenizer:
  """Renders and tokenizes conversations for one tokenizer, template and vision tower.

  tokenizer: a fast transformers tokenizer (offsets are needed); template: see
  `templates.resolve_template` (`template_source` says which one it is); `content_style`:
  "string" or "list" (detected, see the module docstring); image_token_id / image_seq_len: the
  model's (`LlavaConfig`); use `image_seq_len=0` for a text-only model. Anyres models
  (LLaVA-NeXT / OneVision) pass their per-image counts to `encode(..., image_tokens=...)`;
  `image_seq_len` is then only the count used when none are given (it must be > 0 for a model
  with images). `image_text`: the checkpoint's own text for one image, holding the image token
  once (Qwen2-VL: `<|vision_start|><|image_pad|><|vision_end|>`); every placeholder becomes it
  (see the module docstring), and the image token may not appear in the records' text.
  `video_text` / `video_token_id` (Qwen-VL: `<|vision_start|><|video_pad|>
  <|vision_end|>`): the same for videos, marked `<video>` in the records (`video_placeholder`);
  without them a model takes no videos.
  """

  def __init__(self, tokenizer, image_token_id: int, image_seq_len: int,
               template: str | None = None, image_placeholder: str = IMAGE_PLACEHOLDER,
               image_text: str | None = None, video_text: str | None = None,
               video_token_id: int | None = None,
               video_placeholder: str = VIDEO_PLACEHOLDER):
    if not getattr(tokenizer, "is_fast", False):
      raise ValueError("a fast (Rust) tokenizer is required for character offsets; load it "
                       "with AutoTokenizer.from_pretrained(..., use_fast=True)")
    self.tokenizer = tokenizer
    self.template, self.template_source = resolve_template(tokenizer, template)
    self.image_token_id = int(image_token_id)
    self.image_seq_len = int(image_seq_len)
    self.placeholder = image_placeholder
    self.image_text = image_text
    self.placeholder_id = self._placeholder_token_id()
    self.video_text, self.video_placeholder = video_text, video_placeholder
    self.video_token_id = -1 if video_token_id is None else int(video_token_id)
    if (video_text is None) != (video_token_id is None):
      raise ValueError("video_text and video_token_id are given together (or neither)")
    if video_text is not None:
      ids = tokenizer.encode(video_text, add_special_tokens=False)
      if ids.count(self.video_token_id) != 1:
        raise ValueError(f"the video text {video_text!r} tokenizes to {ids}, which must hold "
                         f"the video token id {self.video_token_id} exactly once")
    self.uses_generation_tags = bool(GENERATION_TAG.search(self.template))
    self.content_style = content_style(
        lambda msgs: self.tokenizer.apply_chat_template(msgs, chat_template=self.template,
                                                        tokenize=False),
        image_placeholder, self.image_seq_len > 0, self.template_source, image_text)
    specials = {str(t) for t in tokenizer.all_special_tokens}
    specials |= {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    specials.discard(image_placeholder)
    specials.discard(getattr(tokenizer, "bos_token", None))  # a BOS never ends a turn
    alternatives = "|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True) if s)
    self._end_token = re.compile(rf"\s*(?:{alternatives})") if alternatives else None
    self._warned_no_end = False

  def _placeholder_token_id(self) -> int:
    """The placeholder's token id (added to the tokenizer when missing); -1 for text-only
    models (`image_seq_len=0`), where any placeholder in the text is an image-count error."""
    if self.image_seq_len == 0:
      return -1
    tok = self.tokenizer
    if self.image_text is not None:  # the checkpoint's form: its image token is the placeholder
      ids = tok.encode(self.image_text, add_special_tokens=False)
      if ids.count(self.image_token_id) != 1:
        raise ValueError(f"the image text {self.image_text!r} tokenizes to {ids}, which must "
                         f"hold the image token id {self.image_token_id} exactly once (is the "
                         "image token a special token of the tokenizer?)")
      return self.image_token_id
    ids = tok.encode(self.placeholder, add_special_tokens=False)
    if len(ids) != 1:
      from tokenizers import AddedToken
      tok.add_tokens([AddedToken(self.placeholder, special=True, normalized=False)])
      ids = tok.encode(self.placeholder, add_special_tokens=False)
      log.info("added %r to the tokenizer as special token %d", self.placeholder, ids[0])
    return int(ids[0])

  def render(self, messages: Sequence[dict], add_generation_prompt: bool = False,
             where: str = "record") -> str:
    """The chat template's text; a template that rejects the conversation (e.g. "roles must
    alternate") raises `DataError` naming `where`."""
    return self._apply(messages, where, tokenize=False,
                       add_generation_prompt=add_generation_prompt)

  def _apply(self, messages: Sequence[dict], where: str, **kw):
    """`apply_chat_template` on string-content `messages`, in the template's content style."""
    msgs = list(messages)
    if self.content_style == "list":
      msgs = to_list_contents(msgs, self.placeholder,
                              self.video_placeholder if self.video_text else None)
    try:
      return self.tokenizer.apply_chat_template(msgs, chat_template=self.template, **kw)
    except Exception as e:  # jinja2 TemplateError, raise_exception(...) in the template
      raise DataError(f"{where}: the chat template ({self.template_source}) rejects the "
                      f"conversation ({type(e).__name__}: {e}); if the template is at fault, "
                      f"{FIX}", "template") from None

  def assistant_spans(self, messages: Sequence[dict], full: str, where: str,
                      subst=lambda text: text) -> list[tuple[int, int]]:
    """Character spans (start, end) of each assistant turn's content + end token in `full`
    (`subst`: what was done to the rendered text, done to each prefix too)."""
    spans = []
    for i, m in enumerate(messages):
      if m["role"] != "assistant":
        continue
      prefix = subst(self.render(messages[:i], add_generation_prompt=True, where=where))
      if not full.startswith(prefix):
        raise DataError(f"{where}: the chat template renders turn {i} differently once later "
                        "turns follow (not prefix-stable); add {% generation %} blocks to it",
                        "template")
      content = m["content"]  # verbatim, else as templates that strip it render it
      start = full.find(content, len(prefix))
      if start < 0:
        content = content.strip()
        start = full.find(content, len(prefix))
      if start < 0:
        raise DataError(f"{where}: assistant turn {i} does not appear verbatim in the rendered "
                        "conversation; add {% generation %} blocks to the template", "template")
      end = start + len(content)
      match = self._end_token.match(full, end) if self._end_token else None
      if match:
        end = match.end()
      elif not self._warned_no_end:
        self._warned_no_end = True
        log.warning("the chat template writes no end-of-turn special token after assistant "
                    "turns: the model will not learn where a reply stops")
      spans.append((start, end))
    return spans

  def encode_messages(self, messages: Sequence[dict], num_images: int, where: str = "record",
                      image_tokens: Sequence[int] | None = None,
                      video_tokens: Sequence[int] = (),
                      video_texts: Sequence[str] | None = None) -> TokenizedConversation:
    """Chat messages (with inline placeholders) + the number of images -> tokens and masks.

    image_tokens: optional tokens per image, in placeholder order (anyres models); default
    `image_seq_len` for every image. video_tokens: tokens per video pad, in text order (models
    with `video_text`: one pad per video). video_texts (Qwen3-VL): per video, the text that
    replaces its rendered `video_text` (timestamps and one pad per frame pair); video_tokens
    then counts per pad, over all the videos' pads.
    """
    if num_images and not self.image_seq_len:
      raise DataError(f"{where}: {num_images} image(s) but the model is text-only",
                      "image_count")
    per_image = self._per_image_counts(num_images, image_tokens, where)
    n_placeholders = count_placeholders(messages, self.placeholder)
    if n_placeholders != num_images:
      raise DataError(f"{where}: {n_placeholders} {self.placeholder} placeholder(s) in the "
                      f"conversation but {num_images} image(s)", "image_count")
    per_video = self._per_video_counts(messages, video_tokens, where,
                                       None if video_texts is None else len(video_texts))
    messages = self._image_text_messages(messages, where)
    subst = self._video_substitution(video_texts)
    tok = self.tokenizer
    if self.uses_generation_tags:
      if video_texts:
        raise DataError(f"{where}: per-frame video text with a {{% generation %}} template is "
                        "not supported", "template", fatal=True)
      out = self._apply(messages, where, tokenize=True, return_dict=True,
                        return_assistant_tokens_mask=True)
      ids = np.asarray(out["input_ids"], np.int64)
      mask = np.asarray(out["assistant_masks"], np.int32)
    else:
      full = subst(self.render(messages, where=where))
      enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
      ids = np.asarray(enc["input_ids"], np.int64)
      mask = overlap_mask(enc["offset_mapping"],
                          self.assistant_spans(messages, full, where, subst))
    return self._expand_images(ids, mask, num_images, where, per_image, per_video)

  def _per_video_counts(self, messages: Sequence[dict], video_tokens: Sequence[int],
                        where: str, num_videos: int | None = None) -> np.ndarray:
    """int64 tokens per video pad; the `<video>` placeholders must number the videos
    (`num_videos`, default one per count)."""
    counts = np.asarray(list(video_tokens), np.int64).reshape(-1)
    n_videos = len(counts) if num_videos is None else num_videos
    if n_videos and self.video_text is None:
      raise DataError(f"{where}: {n_videos} video(s) but the model takes no videos",
                      "image_count")
    if self.video_text is None:
      return counts
    n = count_placeholders(messages, self.video_placeholder)
    if n != n_videos:
      raise DataError(f"{where}: {n} {self.video_placeholder} placeholder(s) in the "
                      f"conversation but {n_videos} video(s)", "image_count")
    if np.any(counts < 1):
      raise DataError(f"{where}: video token counts {counts.tolist()} hold a count < 1",
                      "image_count")
    return counts

  def _video_substitution(self, video_texts: Sequence[str] | None):
    """text -> text with its k-th rendered `video_text` replaced by `video_texts[k]` (in
    order, as far as the text has them); the identity without `video_texts`."""
    if not video_texts:
      return lambda text: text
    form = self.video_text

    def subst(text: str) -> str:
      parts = text.split(form)
      if len(parts) - 1 > len(video_texts):
        raise ValueError(f"the text renders {len(parts) - 1} videos for {len(video_texts)}")
      return "".join(p + (video_texts[k] if k < len(parts) - 1 else "")
                     for k, p in enumerate(parts))
    return subst

  def _image_text_messages(self, messages: Sequence[dict], where: str) -> list[dict]:
    """With `image_text`: the image token written in the text is refused, and string-style
    templates get each placeholder replaced by `image_text` (list-style ones render image items
    themselves). Without it: `messages` unchanged."""
    if self.image_text is None:
      return list(messages)
    marks = [(self.image_token_id, self.placeholder, self.image_text, "image")]
    if self.video_text is not None:
      marks.append((self.video_token_id, self.video_placeholder, self.video_text, "video"))
    for token_id, placeholder, _, name in marks:
      token = self.tokenizer.convert_ids_to_tokens(token_id)
      for i, m in enumerate(messages):
        if token and token in m["content"]:
          raise DataError(f"{where}: conversations[{i}].value holds the {name} token "
                          f"{token!r} as text; mark {name}s with {placeholder}", "image_count")
    if self.content_style == "list":
      return list(messages)
    out = []
    for m in messages:
      text = m["content"]
      for _, placeholder, form, _ in marks:
        text = text.replace(placeholder, form)
      out.append({**m, "content": text})
    return out

  def encode(self, conversations: Sequence[dict], num_images: int, where: str = "record",
             image_tokens: Sequence[int] | None = None, video_tokens: Sequence[int] = (),
             video_texts: Sequence[str] | None = None) -> TokenizedConversation:
    """LLaVA turns (`from`/`value`) -> `TokenizedConversation`; errors name `where`.
    `image_tokens` / `video_tokens` / `video_texts`: see `encode_messages`."""
    return self.encode_messages(to_messages(conversations, where), num_images, where,
                                image_tokens, video_tokens, video_texts)

  def encode_prompt(self, conversations: Sequence[dict], num_images: int,
                    where: str = "record", image_tokens: Sequence[int] | None = None,
                    video_tokens: Sequence[int] = (),
                    video_texts: Sequence[str] | None = None) -> np.ndarray:
    """The generation prompt for a record's last assistant turn (its reference answer):
    the turns before it rendered with the template's generation prompt
    (`add_generation_prompt=True`) and tokenized as `encode` does, each placeholder expanded
    to its image tokens (`image_tokens` as in `encode`). int32 (P,). Independent of the answer.
    """
    messages = to_messages(conversations, where)
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    head = messages[:last]
    in_head = count_placeholders(head, self.placeholder)
    if in_head != num_images:
      raise DataError(f"{where}: the prompt before the last assistant turn holds {in_head} "
                      f"{self.placeholder} placeholder(s) for {num_images} image(s)",
                      "image_count")
    per_image = self._per_image_counts(num_images, image_tokens, where)
    per_video = self._per_video_counts(head, video_tokens, where,
                                       None if video_texts is None else len(video_texts))
    text = self.render(self._image_text_messages(head, where), add_generation_prompt=True,
                       where=where)
    text = self._video_substitution(video_texts)(text)
    ids = np.asarray(self.tokenizer(text, add_special_tokens=False)["input_ids"], np.int64)
    return self._expand_images(ids, np.zeros(ids.shape, np.int32), num_images, where,
                               per_image, per_video).input_ids

  def _per_image_counts(self, num_images: int, image_tokens: Sequence[int] | None,
                        where: str) -> np.ndarray:
    """(num_images,) int64 tokens per image: `image_tokens` checked, or `image_seq_len`."""
    if image_tokens is None:
      return np.full((num_images,), self.image_seq_len, np.int64)
    counts = np.asarray(image_tokens, np.int64).reshape(-1)
    if counts.shape[0] != num_images:
      raise DataError(f"{where}: {counts.shape[0]} per-image token count(s) (image_tokens) "
                      f"for {num_images} image(s)", "image_count")
    if np.any(counts < 1):
      raise DataError(f"{where}: image_tokens {counts.tolist()} holds a count < 1",
                      "image_count")
    return counts

  def _expand_images(self, ids: np.ndarray, mask: np.ndarray, num_images: int,
                     where: str, per_image: np.ndarray | None = None,
                     per_video: np.ndarray | None = None) -> TokenizedConversation:
    is_ph = ids == self.placeholder_id
    if int(is_ph.sum()) != num_images:
      raise DataError(f"{where}: the rendered conversation holds {int(is_ph.sum())} image "
                      f"token(s) for {num_images} image(s) (does the template add or drop "
                      f"{self.placeholder}?)", "image_count")
    if np.any((ids == self.image_token_id) & ~is_ph):
      raise DataError(f"{where}: a text token has id {self.image_token_id}, the model's "
                      "image_token_id", "image_count")
    per_video = np.zeros(0, np.int64) if per_video is None else per_video
    is_vph = (ids == self.video_token_id) if self.video_text is not None else np.zeros_like(is_ph)
    if int(is_vph.sum()) != len(per_video):
      raise DataError(f"{where}: the rendered conversation holds {int(is_vph.sum())} video "
                      f"token(s) for {len(per_video)} video(s) (does the template add or drop "
                      f"{self.video_placeholder}?)", "image_count")
    if per_image is None:
      per_image = np.full((num_images,), self.image_seq_len, np.int64)
    repeats = np.ones(ids.shape, np.int64)
    repeats[is_ph] = per_image  # placeholder i (in text order) -> per_image[i] copies
    repeats[is_vph] = per_video
    out_ids = np.repeat(np.where(is_ph, self.image_token_id, ids), repeats).astype(np.int32)
    out_mask = np.repeat(np.where(is_ph | is_vph, 0, mask), repeats).astype(np.int32)
    out_mask[:1] = 0
    starts = (np.cumsum(repeats) - repeats)[is_ph | is_vph].astype(np.int32)
    return TokenizedConversation(out_ids, out_mask, np.arange(len(out_ids), dtype=np.int32),
                                 starts)
