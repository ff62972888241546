"""LLaVA turns -> validated chat messages, placeholder counts, and the token mask of character
spans (the pieces of `conversation.ChatTokenizer` that need no tokenizer)."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mllm_tune.data.errors import DataError

IMAGE_PLACEHOLDER = "<image>"
VIDEO_PLACEHOLDER = "<video>"
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
         "system": "system"}


def to_messages(conversations: Sequence[dict], where: str = "record") -> list[dict]:
  """LLaVA turns (`from`/`value`) -> chat messages (`role`/`content`), validated.

  Raises `DataError` naming `where`, the turn index and the field for unknown roles, non-string
  values, empty assistant turns, or a conversation without an assistant turn.
  """
  if not isinstance(conversations, (list, tuple)) or not conversations:
    raise DataError(f"{where}: 'conversations' must be a non-empty list of turns", "bad_record")
  messages = []
  for i, turn in enumerate(conversations):
    if not isinstance(turn, dict):
      raise DataError(f"{where}: conversations[{i}] is a {type(turn).__name__}, not an object",
                      "bad_record")
    role = turn.get("from", turn.get("role"))
    content = turn.get("value", turn.get("content"))
    if role not in ROLES:
      raise DataError(f"{where}: conversations[{i}].from = {role!r} is not one of "
                      f"{sorted(ROLES)}", "bad_record")
    if not isinstance(content, str):
      raise DataError(f"{where}: conversations[{i}].value must be a string, got "
                      f"{type(content).__name__}", "bad_record")
    if ROLES[role] == "assistant" and not content.strip():
      raise DataError(f"{where}: conversations[{i}] ({role}) is an empty assistant turn",
                      "empty_turn")
    messages.append({"role": ROLES[role], "content": content})
  if messages[0]["role"] == "assistant":
    raise DataError(f"{where}: the conversation starts with an assistant turn", "bad_record")
  if not any(m["role"] == "assistant" for m in messages):
    raise DataError(f"{where}: no assistant turn, so nothing to learn", "bad_record")
  return messages


def count_placeholders(messages: Sequence[dict], placeholder: str = IMAGE_PLACEHOLDER) -> int:
  return sum(m["content"].count(placeholder) for m in messages)


def overlap_mask(offsets: Sequence[tuple[int, int]],
                 spans: Sequence[tuple[int, int]]) -> np.ndarray:
  """(T,) int32: 1 for tokens whose character range overlaps one of the sorted spans."""
  mask = np.zeros(len(offsets), np.int32)
  k = 0
  for t, (start, end) in enumerate(offsets):
    while k < len(spans) and start >= spans[k][1]:
      k += 1
    if k == len(spans):
      break
    if end > spans[k][0]:
      mask[t] = 1
  return mask
