"""Chat templates: the built-in ones, where a model directory keeps its own, and which message
content style a template expects.

Templates come in two content styles:
- "string": `message['content']` is the text with inline `<image>` placeholders (LLaVA's own
  format, Vicuna / ChatML templates);
- "list": `message['content']` is a list of items, `{"type": "image"}` and `{"type": "text",
  "text": ...}` (llava-hf and LLaVA-OneVision templates, which write `<image>` per image item).
`content_style` finds the one a template renders a probe conversation with (its text kept and
one `<image>` per image); `to_list_contents` turns LLaVA messages into list-style ones, an image
item per placeholder, in order, the whitespace beside a placeholder left to the template.
Checkpoints with their own text for an image (Qwen2-VL / 2.5-VL / 3-VL: an image item renders as
`<|vision_start|><|image_pad|><|vision_end|>`) try list style first: their templates accept both
styles, and list contents are what transformers' processor is given and what Qwen's own
fine-tuning code builds from LLaVA records (`<image>\nWhat?` -> image item, text "What?"), so
training sees the prompts of inference.

`load_tokenizer` reads a model directory's tokenizer and, when its config holds no chat
template, the processor's (`chat_template.jinja`, or `chat_template.json` as older transformers
wrote it).
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Sequence

from mllm_tune.data.errors import DataError

VICUNA_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the human's "
                 "questions.")
# LLaVA-1.5 `conv_vicuna_v1` (SeparatorStyle.TWO, sep " ", sep2 "</s>") with BOS first:
# "<s>SYSTEM USER: q ASSISTANT: a</s>USER: q2 ASSISTANT: a2</s>"; generation prompt "ASSISTANT:".
VICUNA_V1 = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + ' ' }}"
    "{% set loop_messages = messages[1:] %}{% else %}{{ '" + VICUNA_SYSTEM.replace("'", "\\'")
    + " ' }}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}{% if message['role'] == 'user' %}"
    "{{ 'USER: ' + message['content'] + ' ' }}{% elif message['role'] == 'assistant' %}"
    "{{ 'ASSISTANT: ' + message['content'] + eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")
# Qwen2-Instruct's template (ChatML, default system prompt), without tool calls.
CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
BUILTIN_TEMPLATES = {"vicuna_v1": VICUNA_V1, "chatml": CHATML, "qwen2": CHATML}
GENERATION_TAG = re.compile(r"{%-?\s*generation\s*-?%}")
STYLES = ("string", "list")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
FIX = ("set one that renders LLaVA conversations: --config.data.template=vicuna_v1 (LLaVA-1.5), "
       "chatml (Qwen2 / LLaVA-OneVision) or the template's Jinja text (data.template; "
       "template= in Python)")
_PROBE_USER, _PROBE_ANSWER = "mllmprobequestion", "mllmprobeanswer"


def resolve_template(tokenizer, template: str | None) -> tuple[str, str]:
  """-> (Jinja text, what it is for messages): None -> the tokenizer's `chat_template`; a
  built-in name -> its Jinja; else the string is Jinja."""
  if template is None:
    own = getattr(tokenizer, "chat_template", None)
    where = getattr(tokenizer, "name_or_path", "") or "the tokenizer"
    if not own:
      raise ValueError("the tokenizer has no chat_template: pass template= one of "
                       f"{sorted(BUILTIN_TEMPLATES)} or a Jinja string")
    if isinstance(own, dict):
      if "default" not in own:
        raise ValueError(f"the tokenizer has named chat templates {sorted(own)} but no "
                         "'default': pass template= explicitly")
      own = own["default"]
    return own, f"the tokenizer's own chat_template ({where})"
  if template in BUILTIN_TEMPLATES:
    return BUILTIN_TEMPLATES[template], f"the built-in template {template!r}"
  return template, "the Jinja template given as data.template"


def to_list_contents(messages: Sequence[dict], placeholder: str,
                     video_placeholder: str | None = None) -> list[dict]:
  """String-content messages -> list-style ones: each placeholder becomes `{"type": "image"}`
  (each `video_placeholder`, `{"type": "video"}`) and the text around it `{"type": "text",
  "text": ...}` items (in order; whitespace next to a placeholder dropped, as list-style
  templates write their own; empty texts dropped). A content without placeholders becomes one
  text item, verbatim."""
  marks = [placeholder] + ([video_placeholder] if video_placeholder else [])
  split = re.compile("(" + "|".join(re.escape(m) for m in marks) + ")")
  out = []
  for m in messages:
    parts = split.split(m["content"])  # text, mark, text, mark, ..., text
    texts, kinds = parts[::2], parts[1::2]
    items = []
    for k, text in enumerate(texts):
      if k:
        items.append({"type": "image" if kinds[k - 1] == placeholder else "video"})
        text = text.lstrip()
      if k < len(texts) - 1:
        text = text.rstrip()
      if text or len(texts) == 1:
        items.append({"type": "text", "text": text})
    out.append({**m, "content": items})
  return out


def content_style(render: Callable[[list[dict]], str], placeholder: str, with_image: bool,
                  source: str, image_text: str | None = None) -> str:
  """"string" or "list": the first style in which the template (`render(messages) -> text`)
  keeps a probe conversation's text and writes one image per image. `image_text`: the
  checkpoint's own text for one image (see the module docstring): list style is tried first and
  each image must render as it (string contents then hold it in place of the placeholder);
  without it, string style first and one `placeholder` per image. Raises `DataError`
  ("template", fatal) naming `source`, why each style failed, and what to set instead."""
  mark = image_text or placeholder
  probe = [{"role": "user", "content": (placeholder + "\n" if with_image else "") + _PROBE_USER},
           {"role": "assistant", "content": _PROBE_ANSWER}]
  want = 1 if with_image else 0
  reasons = []
  for style in (STYLES[::-1] if image_text else STYLES):
    if style == "list":
      msgs = to_list_contents(probe, placeholder)
    else:
      msgs = [{**m, "content": m["content"].replace(placeholder, mark)} for m in probe]
    try:
      text = render(msgs)
    except Exception as e:  # jinja2 errors, raise_exception(...) in the template
      reasons.append(f"with {style} contents it raises {type(e).__name__}: {e}")
      continue
    lost = [turn for w, turn in ((_PROBE_USER, "user"), (_PROBE_ANSWER, "assistant"))
            if w not in text]
    n = text.count(mark)
    if lost:
      reasons.append(f"with {style} contents it drops the text of the {' and '.join(lost)} "
                     "turn")
    elif n != want:
      reasons.append(f"with {style} contents it writes {n} {mark} for {want} image(s)")
    else:
      return style
  raise DataError(f"chat template: {source} cannot render LLaVA conversations ("
                  + "; ".join(reasons) + f"): {FIX}", "template", fatal=True)


def load_tokenizer(model_dir: str):
  """The fast tokenizer stored in a model directory (offline), with the processor's chat
  template when the tokenizer has none (`chat_template.jinja`, else `chat_template.json`)."""
  from transformers import AutoTokenizer
  if os.path.isdir(model_dir) and not any(os.path.isfile(os.path.join(model_dir, f))
                                          for f in TOKENIZER_FILES):
    raise FileNotFoundError(f"{model_dir}: no tokenizer files (one of {list(TOKENIZER_FILES)})")
  tok = AutoTokenizer.from_pretrained(model_dir, use_fast=True)
  if not getattr(tok, "chat_template", None):
    template = processor_chat_template(model_dir)
    if template:
      tok.chat_template = template
  return tok


def processor_chat_template(model_dir: str) -> str | None:
  """The chat template a processor saved beside the model (`chat_template.jinja`; transformers
  before 4.52: `chat_template.json` {"chat_template": ...}), or None."""
  jinja = os.path.join(model_dir, "chat_template.jinja")
  if os.path.isfile(jinja):
    with open(jinja) as f:
      return f.read()
  path = os.path.join(model_dir, "chat_template.json")
  if not os.path.isfile(path):
    return None
  try:
    with open(path) as f:
      d = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}:{e.lineno}:{e.colno}: malformed JSON: {e.msg}") from None
  template = d.get("chat_template") if isinstance(d, dict) else None
  if not isinstance(template, str):
    raise ValueError(f"{path}: expected {{\"chat_template\": \"<Jinja>\"}}")
  return template
