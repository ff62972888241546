"""VQA accuracy with the official answer normalization, and exact match.

`normalize_vqa_answer` reproduces the official VQA evaluation (`vqaEval.py`, VQA v2 /
EvalAI), in order:
1. newlines and tabs become spaces; the text is stripped;
2. punctuation `; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !`: each mark is deleted if it is
   written next to a space anywhere in the (original) text, or if the text holds a digit-comma-
   digit group ("1,000"); otherwise it becomes a space;
3. periods not followed by a digit are deleted ("3.5" keeps its point; the official code passes
   `re.UNICODE` as the `count` argument of `re.sub`, so at most 32 are removed: kept here);
4. lowercase, split on whitespace, number words zero..ten and "none" become digits, the
   articles a / an / the are dropped;
5. the contraction map restores apostrophes ("dont" -> "don't", "whats" -> "what's").
Apostrophes and colons are not punctuation here ("don't" stays).

VQA accuracy of a prediction against the n (=10) human answers is the mean, over the n
leave-one-out subsets of n-1 answers, of `min(#subset answers equal to the prediction / 3, 1)`.
"""
from __future__ import annotations

import re
import string
from typing import Sequence

# vqaEval.py's contraction map (keys with capitals can never match after lowercasing; kept
# verbatim so results are identical).
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                 "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = frozenset({"a", "an", "the"})
_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@",
          "`", ",", "?", "!")
# As written in vqaEval.py: `(?!<=\d)` is a (vacuous) lookahead, so this deletes every period
# not followed by a digit.
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
_OFFICIAL_PERIOD_COUNT = int(re.UNICODE)  # the accidental `count` of the official re.sub


def _clean_whitespace(text: str) -> str:
  return text.replace("\n", " ").replace("\t", " ").strip()


def process_punctuation(text: str) -> str:
  """Rules 2-3 of the module docstring (vqaEval.py `processPunctuation`)."""
  out = text
  glued = _DIGIT_COMMA_DIGIT.search(text) is not None
  for p in _PUNCT:
    if glued or (p + " " in text) or (" " + p in text):
      out = out.replace(p, "")
    else:
      out = out.replace(p, " ")
  return _PERIOD.sub("", out, count=_OFFICIAL_PERIOD_COUNT)


def process_digit_article(text: str) -> str:
  """Rules 4-5 of the module docstring (vqaEval.py `processDigitArticle`)."""
  words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
  return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def normalize_vqa_answer(text: str) -> str:
  """The official VQA answer normalization (rules 1-5 of the module docstring)."""
  return process_digit_article(process_punctuation(_clean_whitespace(text)))


def vqa_accuracy(prediction: str, answers: Sequence[str], *,
                 normalize_unanimous: bool = True) -> float:
  """VQA accuracy in [0, 1] of one prediction against n >= 2 human answers (10 in VQA v2).

  mean over i of min(1, #{j != i : answers[j] == prediction} / 3), after normalizing the
  prediction and every answer, compared case-insensitively. `normalize_unanimous=False`
  reproduces a quirk of vqaEval.py exactly: when all human answers are identical, neither they
  nor the prediction are normalized (only whitespace-cleaned and lowercased).
  """
  if isinstance(answers, str) or len(answers) < 2:
    raise ValueError("vqa_accuracy needs a list of >= 2 human answers (use exact_match for "
                     "single-reference answers)")
  pred = _clean_whitespace(prediction)
  refs = [_clean_whitespace(a) for a in answers]
  if normalize_unanimous or len(set(refs)) > 1:
    pred = normalize_vqa_answer(pred)
    refs = [normalize_vqa_answer(a) for a in refs]
  pred = pred.lower()
  hits = [r.lower() == pred for r in refs]
  total = sum(hits)
  return sum(min(1.0, (total - h) / 3.0) for h in hits) / len(hits)


def mean_vqa_accuracy(predictions: Sequence[str], answers: Sequence[Sequence[str]],
                      **kwargs) -> float:
  """Average `vqa_accuracy` over a dataset (raises if the two lists differ in length)."""
  if len(predictions) != len(answers):
    raise ValueError(f"{len(predictions)} predictions but {len(answers)} answer lists")
  if not predictions:
    raise ValueError("no predictions to score")
  return sum(vqa_accuracy(p, a, **kwargs) for p, a in zip(predictions, answers)) / len(answers)


_SQUAD_ARTICLES = re.compile(r"\b(a|an|the)\b")
_SQUAD_PUNCT = frozenset(string.punctuation)


def normalize_text(text: str) -> str:
  """SQuAD answer normalization: lowercase, drop ASCII punctuation and the articles a/an/the,
  collapse whitespace."""
  text = "".join(ch for ch in text.lower() if ch not in _SQUAD_PUNCT)
  return " ".join(_SQUAD_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, references: str | Sequence[str], *,
                normalize: bool = True) -> float:
  """1.0 if the prediction equals any reference (after `normalize_text` when `normalize`;
  otherwise after stripping surrounding whitespace only), else 0.0."""
  refs = [references] if isinstance(references, str) else list(references)
  if not refs:
    raise ValueError("exact_match needs at least one reference")
  norm = normalize_text if normalize else str.strip
  return float(any(norm(prediction) == norm(r) for r in refs))
