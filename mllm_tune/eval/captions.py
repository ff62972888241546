"""Caption metrics: corpus BLEU-1..4 and CIDEr-D, computed exactly as pycocoevalcap's `Bleu(4)`
and `Cider()` scorers (the COCO caption evaluation).

Tokenization: none. Inputs must already be tokenized and normalized the way you want them
scored (COCO runs its Java PTBTokenizer first: lowercase, punctuation removed); sentences are
split on whitespace, exactly as pycocoevalcap does after its tokenizer.

BLEU (corpus level, Papineni et al. 2002 with pycocoevalcap's conventions): clipped n-gram
matches and candidate n-gram counts are summed over the corpus; BLEU-n is
`(prod_{k<=n} (match_k + 1e-15) / (count_k + 1e-9)) ** (1/n)` times the brevity penalty
`exp(1 - r/c)` when c < r, with c the total candidate length and r the sum over sentences of the
reference length closest to the candidate's (ties: the shorter).

CIDEr-D (Vedantam et al. 2015, as coded in pycocoevalcap `Cider`): n-gram (n=1..4) tf-idf
vectors with document frequencies over each image's reference set and idf
`log(#images) - log(max(1, df))`; per image and n, the mean over references of
`sum_g min(h_g, r_g) r_g / (|h| |r|)` (clipped cosine) times `exp(-delta^2 / (2 sigma^2))`;
averaged over n = 1..4 and multiplied by 10. `delta` is the candidate-minus-reference length;
pycocoevalcap counts it in bigrams (kept here), which equals the word-count difference wherever
the similarity is nonzero (both sentences non-empty).
"""
from __future__ import annotations

import math
from collections import Counter
from typing import Sequence

import numpy as np

_TINY, _SMALL = 1e-15, 1e-9  # pycocoevalcap's BLEU smoothing constants


def ngram_counts(words: Sequence[str], max_n: int) -> Counter:
  """Counts of every n-gram (as a tuple of words), n = 1..max_n."""
  return Counter(tuple(words[i:i + n]) for n in range(1, max_n + 1)
                 for i in range(len(words) - n + 1))


def _check_corpus(predictions: Sequence[str], references: Sequence[Sequence[str]]):
  if len(predictions) != len(references):
    raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists")
  if not predictions:
    raise ValueError("no predictions to score")
  for i, (p, refs) in enumerate(zip(predictions, references)):
    if not isinstance(p, str):
      raise TypeError(f"prediction {i} must be one string, got {type(p).__name__}")
    if isinstance(refs, str) or len(refs) == 0:
      raise ValueError(f"references[{i}] must be a non-empty list of strings")


def bleu(predictions: Sequence[str], references: Sequence[Sequence[str]],
         max_n: int = 4) -> tuple[list[float], np.ndarray]:
  """(corpus [BLEU-1, ..., BLEU-max_n], per-sentence scores (max_n, N)), pycocoevalcap `Bleu`."""
  _check_corpus(predictions, references)
  match = np.zeros(max_n)
  guess = np.zeros(max_n)
  test_len = ref_len = 0.0
  per = np.zeros((max_n, len(predictions)))
  for i, (pred, refs) in enumerate(zip(predictions, references)):
    words = pred.split()
    counts = ngram_counts(words, max_n)
    ref_words = [r.split() for r in refs]
    max_ref: Counter = Counter()
    for rw in ref_words:
      max_ref |= ngram_counts(rw, max_n)  # elementwise max
    closest = min((abs(len(rw) - len(words)), len(rw)) for rw in ref_words)[1]
    m_i = np.zeros(max_n)
    for g, c in counts.items():
      m_i[len(g) - 1] += min(c, max_ref.get(g, 0))
    g_i = np.array([max(0, len(words) - k) for k in range(max_n)], float)
    per[:, i] = _bleu_from_counts(m_i, g_i, len(words), closest)
    match += m_i
    guess += g_i
    test_len += len(words)
    ref_len += closest
  return _bleu_from_counts(match, guess, test_len, ref_len).tolist(), per


def _bleu_from_counts(match, guess, test_len, ref_len) -> np.ndarray:
  out = np.zeros(len(match))
  prod = 1.0
  for k in range(len(match)):
    prod *= (float(match[k]) + _TINY) / (float(guess[k]) + _SMALL)
    out[k] = prod ** (1.0 / (k + 1))
  ratio = (test_len + _TINY) / (ref_len + _SMALL)
  if ratio < 1:
    out *= math.exp(1 - 1 / ratio)
  return out


def _tfidf(counts: Counter, df: Counter, log_num_images: float, n: int):
  """Per-order tf-idf dicts, their L2 norms and pycocoevalcap's 'length' (bigram count)."""
  vecs = [dict() for _ in range(n)]
  norms = np.zeros(n)
  for g, tf in counts.items():
    w = float(tf) * (log_num_images - np.log(max(1.0, df.get(g, 0.0))))
    vecs[len(g) - 1][g] = w
    norms[len(g) - 1] += w * w
  length = sum(tf for g, tf in counts.items() if len(g) == 2)
  return vecs, np.sqrt(norms), length


def cider_d(predictions: Sequence[str], references: Sequence[Sequence[str]], n: int = 4,
            sigma: float = 6.0) -> tuple[float, np.ndarray]:
  """(corpus CIDEr-D, per-image scores (N,)), pycocoevalcap `Cider(n, sigma)`.

  Document frequencies come from this corpus's references, so the score of one image depends on
  the others (as in COCO evaluation): score a whole split at once.
  """
  _check_corpus(predictions, references)
  ref_counts = [[ngram_counts(r.split(), n) for r in refs] for refs in references]
  df: Counter = Counter()
  for refs in ref_counts:
    df.update(set().union(*(c.keys() for c in refs)))
  log_images = np.log(float(len(predictions)))
  scores = np.zeros(len(predictions))
  for i, pred in enumerate(predictions):
    vec, norm, length = _tfidf(ngram_counts(pred.split(), n), df, log_images, n)
    total = np.zeros(n)
    for rc in ref_counts[i]:
      rvec, rnorm, rlength = _tfidf(rc, df, log_images, n)
      penalty = np.e ** (-(float(length - rlength) ** 2) / (2 * sigma ** 2))
      for k in range(n):
        val = sum(min(w, rvec[k].get(g, 0.0)) * rvec[k].get(g, 0.0) for g, w in vec[k].items())
        if norm[k] != 0 and rnorm[k] != 0:
          val /= norm[k] * rnorm[k]
        total[k] += val * penalty
    scores[i] = np.mean(total) / len(ref_counts[i]) * 10.0
  return float(np.mean(scores)), scores
