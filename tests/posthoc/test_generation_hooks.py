"""Generation hooks for post-hoc methods (generate.py, posthoc.py): the step-0 logit bias of
open-ended calibration, per-step entropies, DaWin's answer entropy and per-cluster decoding.

References: a teacher-forced forward pass of the generated sequence, float64 NumPy entropies, and
two-stage decoding (the forced first token appended to the prompt)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mllm_tune as mt
from mllm_tune.demo import tiny_llava_config
from mllm_tune.eval import beam as beam_lib
from mllm_tune.eval import generate as gen
from mllm_tune.posthoc import dawin_decoding as posthoc
from mllm_tune.eval.sampling import sample_tokens
from mllm_tune.posthoc import calibration
from mllm_tune.posthoc import merging

IMG = [255] * 16  # tiny_llava_config: image token 255, 16 tokens per image
ROWS = [[1, 7] + IMG + [9, 10], [1, 30, 31, 32], [1, 3] + IMG + [4], [1, 50, 51],
        [1, 60] + IMG + IMG + [61]]
NEW = 10
EOS = [116, 133]  # end tokens of the greedy answers of rows 0, 1 and 2 (asserted below)
FORCED = 200      # the token the bias boosts


@pytest.fixture(scope="module")
def setup():
  model = mt.build_model(tiny_llava_config())

  def params(seed):  # lm_head scaled up: peaked, row-dependent entropies instead of ~ln V
    p = mt.init_params(model, jax.random.key(seed))
    p["llm"]["lm_head"]["kernel"] = p["llm"]["lm_head"]["kernel"] * 15.0
    return p

  width = max(map(len, ROWS))
  ids = np.array([[0] * (width - len(r)) + r for r in ROWS], np.int32)
  mask = np.array([[0] * (width - len(r)) + [1] * len(r) for r in ROWS], np.int32)
  px = np.random.RandomState(0).rand(4, 56, 56, 3).astype(np.float32)
  return model, params(0), params(1), ids, mask, px


def _lengths(tokens) -> np.ndarray:
  return np.array([next((i + 1 for i, t in enumerate(r) if t in EOS), len(r))
                   for r in np.asarray(tokens).tolist()])


def _teacher_forced_logits(model, params, ids, mask, px, new_BT) -> np.ndarray:
  """(B, T, V) float64 logits predicting each new token, from one forward pass of prompt + new."""
  full = np.concatenate([ids, np.asarray(new_BT)], axis=1)
  full_mask = np.concatenate([mask, np.ones(np.shape(new_BT), mask.dtype)], axis=1)
  logits = jax.jit(model.apply)({"params": params}, full, full_mask, pixel_values=px)
  p = ids.shape[1]
  return np.asarray(logits, np.float64)[:, p - 1:p - 1 + np.shape(new_BT)[1]]


def _entropy64(logits) -> np.ndarray:
  z = logits - logits.max(-1, keepdims=True)
  logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
  return -(np.exp(logp) * logp).sum(-1)


def _bias(value: float) -> jax.Array:
  return jnp.zeros((256,), jnp.float32).at[FORCED].set(value)


def _append_forced(ids, mask):
  col = np.full((ids.shape[0], 1), FORCED, ids.dtype)
  return np.concatenate([ids, col], 1), np.concatenate([mask, np.ones_like(col)], 1)


def test_first_token_bias_greedy_and_sampling(setup):
  model, p0, _, ids, mask, px = setup
  run = lambda **kw: np.asarray(mt.generate(model, p0, ids, mask, px, max_new_tokens=NEW,
                                            eos_token_id=EOS, **kw))
  plain = run()
  assert _lengths(plain)[:3].tolist() == [4, 7, 1] and (plain[:, 0] != FORCED).all()
  compiled = gen._sample_loop._cache_size()
  np.testing.assert_array_equal(run(first_token_logit_bias=jnp.zeros(256)), plain)
  biased = run(first_token_logit_bias=_bias(100.0))
  assert (biased[:, 0] == FORCED).all()
  # later steps are plain greedy decoding of the prompt + the forced token
  two_stage = np.asarray(mt.generate(model, p0, *_append_forced(ids, mask), px,
                                     max_new_tokens=NEW - 1, eos_token_id=EOS))
  np.testing.assert_array_equal(biased[:, 1:], two_stage)
  assert not np.array_equal(biased[:, 1:], plain[:, 1:])
  # sampling: step 0 is forced; step t >= 1 is the draw with key fold_in(rng, t) from the
  # unbiased logits of the prefix
  key = jax.random.key(7)
  sampled = run(first_token_logit_bias=_bias(100.0), do_sample=True, rng=key, temperature=1.5)
  assert (sampled[:, 0] == FORCED).all()
  logits = _teacher_forced_logits(model, p0, ids, mask, px, sampled)
  n = _lengths(sampled)
  assert n.max() > 3
  for t in range(1, NEW):
    draw = np.asarray(sample_tokens(jax.random.fold_in(key, t), jnp.asarray(logits[:, t],
                                                                            jnp.float32), 1.5))
    live = t < n
    np.testing.assert_array_equal(sampled[live, t], draw[live])
  assert gen._sample_loop._cache_size() == compiled  # the bias is traced: no recompiles
  # generate_text passes it through
  texts = gen.generate_text(model, p0, ids, mask, px, max_new_tokens=NEW, eos_token_id=EOS,
                            decode=lambda toks: " ".join(map(str, toks)),
                            first_token_logit_bias=_bias(100.0))
  assert [t.split()[0] for t in texts] == [str(FORCED)] * len(ROWS)


def test_first_token_bias_beam_search(setup):
  model, p0, _, ids, mask, px = setup
  kw = dict(max_new_tokens=NEW, eos_token_id=EOS, num_beams=2, length_penalty=0.0)
  plain, plain_scores = gen.beam_search(model, p0, ids, mask, px, **kw)
  compiled = beam_lib.beam_loop._cache_size()
  zero, zero_scores = gen.beam_search(model, p0, ids, mask, px, **kw,
                                      first_token_logit_bias=jnp.zeros(256))
  np.testing.assert_array_equal(zero, plain)
  np.testing.assert_array_equal(zero_scores, plain_scores)
  best = np.asarray(mt.generate(model, p0, ids, mask, px, **kw,
                                first_token_logit_bias=_bias(100.0)))
  assert (best[:, 0] == FORCED).all()
  # only FORCED allowed at step 0: its log-prob is 0, so the search from there is the search
  # on prompt + FORCED (length_penalty 0: scores are plain sums, unchanged by the extra token)
  only = jnp.full((256,), -jnp.inf).at[FORCED].set(0.0)
  seqs, scores = gen.beam_search(model, p0, ids, mask, px, **kw, first_token_logit_bias=only)
  seqs = np.asarray(seqs)
  assert (seqs[:, :, 0] == FORCED).all()
  ref, ref_scores = gen.beam_search(model, p0, *_append_forced(ids, mask), px,
                                    **{**kw, "max_new_tokens": NEW - 1})
  np.testing.assert_array_equal(seqs[:, :, 1:], np.asarray(ref))
  np.testing.assert_allclose(np.asarray(scores), np.asarray(ref_scores), atol=1e-4)
  assert not np.array_equal(seqs[:, :, 1:], np.asarray(plain)[:, :, 1:])
  assert beam_lib.beam_loop._cache_size() == compiled


def test_entropies_match_a_teacher_forced_numpy_reference(setup):
  model, p0, _, ids, mask, px = setup
  for kw in ({}, dict(do_sample=True, rng=jax.random.key(1), temperature=1.5)):
    tokens, ent = mt.generate(model, p0, ids, mask, px, max_new_tokens=NEW, eos_token_id=EOS,
                              return_entropy=True, **kw)
    tokens, ent = np.asarray(tokens), np.asarray(ent)
    assert ent.shape == (len(ROWS), NEW) and ent.dtype == np.float32
    np.testing.assert_array_equal(
        tokens, mt.generate(model, p0, ids, mask, px, max_new_tokens=NEW, eos_token_id=EOS, **kw))
    want = _entropy64(_teacher_forced_logits(model, p0, ids, mask, px, tokens))
    live = np.arange(NEW)[None] < _lengths(tokens)[:, None]
    assert not live.all() and live.sum(1).max() == NEW  # rows stop early and late
    np.testing.assert_allclose(ent[live], want[live], atol=1e-4, rtol=0)
    assert (ent[~live] == 0).all() and (ent[live] > 0.1).all()
    assert np.ptp(want[live]) > 1.0  # the entropies vary: the check is not a constant
  # DaWin's H(x): mean over the greedy answer, end token included
  greedy = np.asarray(mt.generate(model, p0, ids, mask, px, max_new_tokens=NEW,
                                  eos_token_id=EOS))
  want = _entropy64(_teacher_forced_logits(model, p0, ids, mask, px, greedy))
  n = _lengths(greedy)
  h = posthoc.answer_entropy(model, p0, ids, mask, px, NEW, eos_token_id=EOS)
  np.testing.assert_allclose(h, [want[b, :n[b]].mean() for b in range(len(ROWS))], atol=1e-4)
  np.testing.assert_array_equal(posthoc.answer_lengths(greedy, EOS), n)


def test_dawin_generate_with_equal_models_is_plain_generate(setup):
  model, p0, _, ids, mask, px = setup
  copy = jax.tree.map(jnp.array, p0)
  tokens, lam, mix = posthoc.dawin_generate(model, p0, copy, ids, mask, px, NEW,
                                            eos_token_id=EOS)
  np.testing.assert_allclose(lam, 0.5, atol=1e-6)
  assert mix is not None and mix.assign_N.shape == (len(ROWS),)
  np.testing.assert_array_equal(tokens, mt.generate(model, p0, ids, mask, px,
                                                    max_new_tokens=NEW, eos_token_id=EOS))


@pytest.mark.parametrize("offset", [False, True])
def test_dawin_clusters_follow_the_formula(setup, offset):
  """Hand-made entropies with three well-separated lambda groups: rows {0, 3}, {1}, {2, 4}."""
  model, p0, p1, ids, mask, px = setup
  target = np.array([0.12, 0.5, 0.88, 0.13, 0.87])
  hft = np.full(5, 3.0)
  h0 = hft + np.log(target / (1 - target))  # e^{-H_ft} / (e^{-H_0} + e^{-H_ft}) = target
  lam = np.exp(-hft) / (np.exp(-h0) + np.exp(-hft))
  if offset:  # docs/methods.md §6.2: b = mean CV (ddof 1), w = (mean H_0 + mean H_ft) / mean H_0
    b = (h0.std(ddof=1) / h0.mean() + hft.std(ddof=1) / hft.mean()) / 2
    w = (h0.mean() + hft.mean()) / h0.mean()
    lam = (np.exp(-hft) + b / w) / (np.exp(-h0) + np.exp(-hft) + b)
  tokens, coef, mix = posthoc.dawin_generate(model, p0, p1, ids, mask, px, NEW, offset=offset,
                                             eos_token_id=EOS, entropies=(h0, hft))
  groups = [[0, 3], [1], [2, 4]]
  for k, rows in enumerate(groups):  # components sorted by mean: group k is component k
    assert mix.assign_N[rows].tolist() == [k] * len(rows)
    np.testing.assert_allclose(coef[rows], lam[rows].mean(), atol=1e-3)
    np.testing.assert_array_equal(coef[rows], mix.means_K[k])
  # each row is decoded by its component's merged model; the three models answer differently
  refs = [np.asarray(mt.generate(model, merging.wise_ft(p0, p1, mix.means_K[k]), ids, mask, px,
                                 max_new_tokens=NEW, eos_token_id=EOS)) for k in range(3)]
  for k, rows in enumerate(groups):
    np.testing.assert_array_equal(np.asarray(tokens)[rows], refs[k][rows])
  assert not np.array_equal(refs[0], refs[2])


def test_calibration_bias_and_bad_arguments(setup):
  model, p0, _, ids, mask, px = setup
  bias = calibration.first_token_bias(256, [FORCED], -50.0)  # unseen first tokens pushed down
  first = np.asarray(mt.generate(model, p0, ids, mask, px, max_new_tokens=1,
                                 first_token_logit_bias=bias))
  assert (first[:, 0] == FORCED).all()
  bad = [(dict(first_token_logit_bias=jnp.zeros(255)), "shape"),
         (dict(first_token_logit_bias=_bias(np.nan)), "NaN"),
         (dict(first_token_logit_bias=_bias(np.inf)), "inf"),
         (dict(return_entropy=True, num_beams=2), "return_entropy")]
  for kw, match in bad:
    with pytest.raises(ValueError, match=match):
      mt.generate(model, p0, ids, mask, px, max_new_tokens=2, **kw)
  with pytest.raises(ValueError, match="return_entropy"):
    gen.generate_text(model, p0, ids, mask, px, decode=str, return_entropy=True)
  with pytest.raises(ValueError, match="entropies"):
    posthoc.dawin_generate(model, p0, p0, ids, mask, px, entropies=(np.ones(4), np.ones(4)))
