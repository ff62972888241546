"""Metrics: BLEU / CIDEr-D vs pycocoevalcap, VQA accuracy (normalization table + leave-one-out
re-derivation), exact match, multiple-choice extraction, token loss / accuracy / perplexity."""
from __future__ import annotations

import math
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider

from mllm_tune.eval import metrics as M

# ----------------------------------------------------------------------------- captions
_WORDS = ("a man dog riding on the red bus street two people sitting bench with green tree "
          "near of in black white cat").split()


def _caption_corpus(n: int = 64, seed: int = 0):
  """Deterministic predictions / references with real n-gram overlap (and an empty and a
  one-word prediction, a single-reference image)."""
  rng = random.Random(seed)
  sentence = lambda lo, hi: " ".join(rng.choice(_WORDS) for _ in range(rng.randint(lo, hi)))
  preds, refs = [], []
  for i in range(n):
    rs = [sentence(3, 12) for _ in range(rng.randint(1, 5))]
    if i % 3 == 0:  # copy-edit a reference so some high-order n-grams match
      words = rs[0].split()
      words[rng.randrange(len(words))] = rng.choice(_WORDS)
      pred = " ".join(words)
    else:
      pred = sentence(2, 12)
    preds.append(pred)
    refs.append(rs)
  preds[5], preds[7], refs[9] = "", "dog", refs[9][:1]
  return preds, refs


def test_bleu_and_cider_match_pycocoevalcap():
  preds, refs = _caption_corpus()
  gts = {i: r for i, r in enumerate(refs)}
  res = {i: [p] for i, p in enumerate(preds)}
  ref_bleu, ref_bleu_each = Bleu(4).compute_score(gts, res, verbose=0)
  ref_cider, ref_cider_each = Cider().compute_score(gts, res)
  ours_bleu, ours_bleu_each = M.bleu(preds, refs)
  ours_cider, ours_cider_each = M.cider_d(preds, refs)
  np.testing.assert_allclose(ours_bleu, ref_bleu, atol=1e-6, rtol=0)
  np.testing.assert_allclose(ours_bleu_each, np.array(ref_bleu_each), atol=1e-6, rtol=0)
  np.testing.assert_allclose(ours_cider, ref_cider, atol=1e-6, rtol=0)
  np.testing.assert_allclose(ours_cider_each, ref_cider_each, atol=1e-6, rtol=0)
  # non-trivial values: every order has matches, and the brevity / length terms matter
  assert all(0.05 < b < 0.9 for b in ours_bleu) and 0.1 < ours_cider < 5


def test_caption_metrics_edge_cases():
  assert M.bleu(["a b c d"], [["a b c d"]])[0] == pytest.approx([1.0] * 4, abs=1e-9)
  with pytest.raises(ValueError, match="non-empty"):
    M.bleu(["a"], [[]])
  with pytest.raises(ValueError, match="2 predictions"):
    M.cider_d(["a", "b"], [["a"]])
  with pytest.raises(TypeError):
    M.cider_d([["a"]], [["a"]])


# ----------------------------------------------------------------------------- VQA
NORMALIZATION = [
    # (raw answer, normalized, rule)
    ("two\tdogs\n", "2 dogs", "tabs/newlines -> spaces, number words -> digits"),
    ("Yes", "yes", "lowercase"),
    ("yes !", "yes", "punctuation next to a space is deleted"),
    ("black/white", "black white", "punctuation elsewhere becomes a space"),
    ("t-shirt", "t shirt", "hyphen becomes a space"),
    ("(red)", "red", "brackets become spaces"),
    ("1,000", "1000", "digit,digit: commas deleted"),
    ("red,blue 1,5", "redblue 15", "digit,digit anywhere: every mark deleted"),
    ("3.5", "3.5", "decimal point kept"),
    ("yes.", "yes", "period not before a digit deleted"),
    ("u.s.a.", "usa", "abbreviation periods deleted"),
    ("a dog", "dog", "article a"),
    ("An apple", "apple", "article an (after lowercasing)"),
    ("the cat on the mat", "cat on mat", "article the"),
    ("none", "0", "none -> 0"),
    ("ten", "10", "ten -> 10"),
    ("eleven", "eleven", "only zero..ten are mapped"),
    ("dont", "don't", "contraction restored"),
    ("whats that", "what's that", "contraction restored"),
    ("don't", "don't", "apostrophes are not punctuation"),
    ("10:30", "10:30", "colons are not punctuation"),
    ("Im", "im", "capitalized keys of the official map never match"),
    ("x" + "." * 40, "x" + "." * 8, "the official re.sub removes at most 32 periods"),
]


@pytest.mark.parametrize("raw, want, rule", NORMALIZATION, ids=[r[2] for r in NORMALIZATION])
def test_vqa_normalization(raw, want, rule):
  assert M.normalize_vqa_answer(raw) == want


def test_vqa_accuracy_hand_checked():
  ten = lambda k, hit="2", miss="3": [hit] * k + [miss] * (10 - k)
  # k matching humans: the k leave-one-out subsets that drop a match see k-1, the rest see k
  assert M.vqa_accuracy("2", ten(0)) == 0.0
  assert M.vqa_accuracy("2", ten(1)) == pytest.approx(0.3)        # 9 * (1/3) / 10
  assert M.vqa_accuracy("2", ten(2)) == pytest.approx(0.6)        # (2/3 + 8 * 2/3) / 10
  assert M.vqa_accuracy("2", ten(3)) == pytest.approx(0.9)        # (3 * 2/3 + 7) / 10
  assert M.vqa_accuracy("2", ten(4)) == 1.0
  assert M.vqa_accuracy(" Two.\n", ten(3)) == pytest.approx(0.9)  # normalized prediction
  assert M.vqa_accuracy("the Dog", ["dog"] * 2 + ["cat"] * 8) == pytest.approx(0.6)
  # the official script skips normalization when all humans agree (case still folded)
  assert M.vqa_accuracy("two", ["2"] * 10) == 1.0
  assert M.vqa_accuracy("two", ["2"] * 10, normalize_unanimous=False) == 0.0
  assert M.vqa_accuracy("YES", ["yes"] * 10, normalize_unanimous=False) == 1.0
  assert M.mean_vqa_accuracy(["2", "cat"], [ten(3), ten(3)]) == pytest.approx(0.45)
  with pytest.raises(ValueError, match=">= 2"):
    M.vqa_accuracy("2", ["2"])
  with pytest.raises(ValueError, match=">= 2"):
    M.vqa_accuracy("2", "2")


def test_vqa_accuracy_matches_leave_one_out_rederivation():
  rng = random.Random(1)
  pool = ["2", "two", "Two.", "red", "the red", "dog", "a dog", "yes", "no", "1,000", "1000"]
  for _ in range(200):
    answers = [rng.choice(pool) for _ in range(10)]
    pred = rng.choice(pool)
    norm_pred = M.normalize_vqa_answer(pred)
    norm = [M.normalize_vqa_answer(a) for a in answers]
    total = np.float64(0.0)
    for i in range(10):
      others = norm[:i] + norm[i + 1:]
      total += min(np.float64(1.0), np.float64(sum(o == norm_pred for o in others)) / 3)
    assert M.vqa_accuracy(pred, answers) == pytest.approx(total / 10, abs=1e-12)


def test_exact_match():
  assert M.exact_match("The Eiffel Tower!", "eiffel tower") == 1.0
  assert M.exact_match("Paris", ["London", " paris "]) == 1.0
  assert M.exact_match("Paris.", "paris", normalize=False) == 0.0
  assert M.exact_match(" Paris ", "Paris", normalize=False) == 1.0
  assert M.exact_match("the cat sat", "cat sat down") == 0.0
  with pytest.raises(ValueError):
    M.exact_match("a", [])


# ----------------------------------------------------------------------------- multiple choice
CHOICES = [
    ("B", "B"), ("b", "B"), ("(b)", "B"), ("[C]", "C"), ("d.", "D"), ("A)", "A"),
    ("  C  ", "C"),
    ("The answer is (B).", "B"), ("The answer is B.", "B"), ("the answer is (c)", "C"),
    ("Answer: C. something", "C"), ("ANSWER: D", "D"), ("The correct option is E", "E"),
    ("I think A is wrong. The answer is D because it is red.", "D"),
    ("Options A and B are wrong; the answer is C", "C"),
    ("C. something", "C"), ("(B) red", "B"), ("a) dog", "A"), ("D: blue", "D"),
    ("I pick (b) because it is larger", "B"),
    ("It must be C", "C"), ("A cat sits on the mat, so B", "B"),
    ("The answer is a dog", None), ("A dog", None), ("I don't know", None),
    ("Either A or B", None), ("F", None), ("", None),
]


@pytest.mark.parametrize("reply, want", CHOICES)
def test_extract_choice(reply, want):
  assert M.extract_choice(reply, num_choices=5) == want


def test_extract_choice_by_option_text_and_accuracy():
  opts = ["red", "green", "blue"]
  assert M.extract_choice("Blue.", options=opts) == "C"
  assert M.extract_choice("green\nbecause grass", options=opts) == "B"
  assert M.extract_choice("D", options=opts) is None  # only A..C exist
  assert M.choice_accuracy(["(A)", "The answer is C.", "no idea"], ["A", "B", "C"],
                           num_choices=4) == pytest.approx(1 / 3)
  with pytest.raises(ValueError, match="num_choices"):
    M.extract_choice("A", num_choices=0)


# ----------------------------------------------------------------------------- token metrics
def _reference_token_metrics(logits, ids, mask):
  """float64 loops over the next-token convention: mask[t] = 1 scores ids[t] under logits[t-1]."""
  nll, hits, n = 0.0, 0, 0
  for b in range(ids.shape[0]):
    for t in range(1, ids.shape[1]):
      if mask[b, t]:
        row = logits[b, t - 1].astype(np.float64)
        lse = row.max() + math.log(np.exp(row - row.max()).sum())
        nll += lse - row[ids[b, t]]
        hits += int(np.argmax(row) == ids[b, t])
        n += 1
  return nll / n, hits / n, n


def test_token_metrics_match_float64_reference():
  rs = np.random.RandomState(0)
  logits = (rs.randn(3, 9, 13) * 2).astype(np.float32)
  ids = rs.randint(0, 13, size=(3, 9))
  right = rs.rand(3, 8) < 0.4  # make some targets the argmax so accuracy is not ~1/13
  ids[:, 1:][right] = np.argmax(logits[:, :-1], -1)[right]
  mask = (rs.rand(3, 9) < 0.7).astype(np.int32)
  mask[:, 0] = 0
  loss, acc, n = _reference_token_metrics(logits, ids, mask)
  stats = jax.jit(M.token_stats)(jnp.asarray(logits), jnp.asarray(ids), jnp.asarray(mask))
  got = M.token_metrics(stats)
  assert got["num_tokens"] == n and got["accuracy"] == pytest.approx(acc, abs=1e-9)
  assert 0 < acc < 1
  assert got["loss"] == pytest.approx(loss, rel=1e-5)
  assert got["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)
  # corpus value over two batches = token-weighted, not a mean of batch values
  parts = [M.token_stats(jnp.asarray(logits[s]), jnp.asarray(ids[s]), jnp.asarray(mask[s]))
           for s in (slice(0, 1), slice(1, 3))]
  summed = M.token_metrics(jax.tree.map(jnp.add, *parts))
  assert summed["loss"] == pytest.approx(loss, rel=1e-5) and summed["num_tokens"] == n


def test_token_metrics_bad_input():
  logits, ids = jnp.zeros((1, 4, 5)), jnp.zeros((1, 4), jnp.int32)
  with pytest.raises(ValueError, match=r"loss_mask\[:, 0\]"):
    M.token_stats(logits, ids, jnp.ones((1, 4), jnp.int32))
  with pytest.raises(ValueError, match="shape"):
    M.token_stats(logits, ids, jnp.ones((1, 3), jnp.int32))
  with pytest.raises(ValueError, match="no target"):
    M.token_metrics(M.token_stats(logits, ids, jnp.zeros((1, 4), jnp.int32)))
