"""Multiple-choice answer extraction (ScienceQA / IconQA / MMBench style option letters).

`extract_choice` reads a model's free-form reply and returns the option letter it chose, or None
when the reply names no option unambiguously. Rules, first match wins (letters are the first
`num_choices` of A, B, C, ...; a lowercase letter counts only where it cannot be an English
word, i.e. alone or in brackets):
1. the whole reply is a letter, optionally bracketed and/or followed by . : or )
   ("B", "(b)", "[C]", "d.", "A)");
2. an explicit statement, the last one if several: "answer is (B)", "Answer: C. red",
   "the correct option is D", "answer: (a)";
3. a reply that starts with a letter and a delimiter: "C. something", "(B) red", "a) dog",
   "D: blue";
4. exactly one distinct bracketed letter anywhere: "I pick (b) because ...";
5. exactly one distinct standalone capital letter among the options, skipping one that starts
   a sentence and is followed by a lowercase word (the article in "A dog ..."): "It must be C",
   "A cat sits, so B" -> B, "Either A or B" -> None;
6. with `options` given: the reply (or its first line), stripped of a trailing period and
   compared case-insensitively, equals exactly one option's text.
"""
from __future__ import annotations

import re
import string
from typing import Sequence

_DELIM = r"[.:)\]]"


def _letters(num_choices: int) -> str:
  if int(num_choices) != num_choices or not 1 <= num_choices <= 26:
    raise ValueError(f"num_choices must be an integer in [1, 26], got {num_choices}")
  return string.ascii_uppercase[:num_choices]


def _rules(letters: str):
  up = f"[{letters}]"
  any_case = f"[{letters}{letters.lower()}]"
  alone = re.compile(rf"^[(\[]?({any_case})[)\]]?[.:)]?$")
  statement = re.compile(  # keyword case-insensitive, a bare letter must be a capital
      rf"(?i:answer|option|choice)(?:\s+(?i:is))?\s*:?\s*(?:\(({any_case})\)|"
      rf"\[({any_case})\]|({up})(?![A-Za-z0-9]))")
  leading = re.compile(rf"^(?:\(({any_case})\)|\[({any_case})\]|({any_case}){_DELIM})(?:\s|$)")
  bracketed = re.compile(rf"\(({any_case})\)|\[({any_case})\]")
  standalone = re.compile(rf"(?<![A-Za-z0-9'])({up})(?![A-Za-z0-9'])")
  return alone, statement, leading, bracketed, standalone


def _is_article(text: str, m: re.Match) -> bool:
  """A capital letter opening a sentence and followed by a lowercase word ("A dog is ...")."""
  before = text[:m.start()].rstrip()
  opens_sentence = not before or before[-1] in ".!?\n"
  return opens_sentence and re.match(r"\s+[a-z]", text[m.end():]) is not None


def _first_group(match: re.Match) -> str:
  return next(g for g in match.groups() if g).upper()


def extract_choice(response: str, num_choices: int = 5,
                   options: Sequence[str] | None = None) -> str | None:
  """The option letter ("A".."Z") a reply chooses, or None (rules in the module docstring).

  `options` (the option texts, in letter order) sets `num_choices` and enables rule 6.
  Rule 2 matches its keywords in any case but a bare letter only as a capital: "The answer is
  B" and "the answer is (b)" give B, "the answer is a dog" gives nothing.
  """
  if options is not None:
    num_choices = len(options)
  letters = _letters(num_choices)
  text = response.strip()
  alone, statement, leading, bracketed, standalone = _rules(letters)
  m = alone.match(text)
  if m:
    return m.group(1).upper()
  found = [_first_group(m) for m in statement.finditer(text)]
  if found:
    return found[-1]
  m = leading.match(text)
  if m:
    return _first_group(m)
  distinct = {_first_group(m) for m in bracketed.finditer(text)}
  if len(distinct) == 1:
    return distinct.pop()
  distinct = {m.group(1) for m in standalone.finditer(text) if not _is_article(text, m)}
  if len(distinct) == 1:
    return distinct.pop()
  if options is not None and text:
    first = text.splitlines()[0].strip().rstrip(".").strip().lower()
    same = [i for i, o in enumerate(options) if o.strip().rstrip(".").strip().lower() == first]
    if len(same) == 1:
      return letters[same[0]]
  return None


def choice_accuracy(responses: Sequence[str], answers: Sequence[str], num_choices: int = 5,
                    options: Sequence[Sequence[str]] | None = None) -> float:
  """Fraction of replies whose extracted letter equals the answer letter (None counts wrong)."""
  if len(responses) != len(answers):
    raise ValueError(f"{len(responses)} responses but {len(answers)} answers")
  if not responses:
    raise ValueError("no responses to score")
  if options is not None and len(options) != len(responses):
    raise ValueError(f"{len(options)} option lists but {len(responses)} responses")
  hits = 0
  for i, (r, a) in enumerate(zip(responses, answers)):
    opts = None if options is None else options[i]
    hits += extract_choice(r, num_choices, opts) == a.strip().upper()
  return hits / len(responses)
