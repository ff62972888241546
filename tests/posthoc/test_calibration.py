"""Logit calibration (calibration.py, Mai et al. NeurIPS 2024): ALG gamma, calibration, candidate
scoring, the first-token bias. References are float64 NumPy written here."""
from __future__ import annotations

import importlib

import jax.numpy as jnp
import numpy as np
import pytest

from mllm_tune.posthoc import calibration as cal


def _alg_reference(z, labels, seen_NC):
  """Loop form of ALG: rows whose class set is empty are skipped."""
  wrong, unseen = [], []
  for n in range(z.shape[0]):
    w = [c for c in range(z.shape[1]) if seen_NC[n, c] and c != labels[n]]
    u = [c for c in range(z.shape[1]) if not seen_NC[n, c]]
    if w:
      wrong.append(np.mean(z[n, w]))
    if u:
      unseen.append(np.mean(z[n, u]))
  return np.mean(wrong) - np.mean(unseen)


def test_alg_gamma_matches_the_loop_reference():
  rng = np.random.RandomState(0)
  z = rng.randn(50, 8) * 3
  labels = rng.randint(0, 8, 50)  # some labels unseen: all seen classes count as wrong
  seen = np.array([True] * 5 + [False] * 3)
  want = _alg_reference(z, labels, np.broadcast_to(seen, z.shape))
  np.testing.assert_allclose(cal.alg_gamma(z, labels, seen), want, rtol=1e-5)
  seen_NC = rng.rand(50, 8) < 0.5  # per-row candidate sets (multiple choice)
  seen_NC[:, 0], seen_NC[:, 1], seen_NC[:, 2] = True, True, False
  np.testing.assert_allclose(cal.alg_gamma(z, labels, seen_NC),
                             _alg_reference(z, labels, seen_NC), rtol=1e-5)


def test_alg_recovers_the_shift_of_unseen_classes_and_unseen_accuracy_rises():
  rng = np.random.RandomState(1)
  c, delta = 20, 2.0
  seen = np.arange(c) < 10

  def fine_tuned_logits(labels):
    z = rng.randn(labels.size, c)
    z[np.arange(labels.size), labels] += 3.0
    return z - delta * ~seen, z  # fine-tuning shifted the unseen classes by -delta

  train_labels = rng.randint(0, 10, 2000)  # the tuning split: seen classes only
  gamma = float(cal.alg_gamma(fine_tuned_logits(train_labels)[0], train_labels, seen))
  # std of the estimate ~ sqrt(1 / (2000 * 9) + 1 / (2000 * 10)) = 0.01; tolerance 5 sigma
  assert abs(gamma - delta) < 0.05, gamma
  test_labels = rng.randint(10, 20, 2000)  # test on unseen classes
  shifted, oracle = fine_tuned_logits(test_labels)
  acc = lambda z: float(np.mean(np.argmax(np.asarray(z), -1) == test_labels))  # noqa: E731
  before, after = acc(shifted), acc(cal.calibrate(shifted, ~seen, gamma))
  assert before < 0.4 and after > before + 0.3 and abs(after - acc(oracle)) < 0.02


def test_calibrate_adds_gamma_to_unseen_classes_only():
  z = jnp.arange(12.0).reshape(2, 6)
  unseen = np.array([False, True, False, False, True, True])
  got = np.asarray(cal.calibrate(z, unseen, 1.5))
  np.testing.assert_array_equal(got, np.asarray(z) + 1.5 * unseen)
  per_row = np.array([[True] + [False] * 5, [False] * 5 + [True]])
  np.testing.assert_array_equal(cal.calibrate(z, per_row, -1.0), np.asarray(z) - per_row)


def test_candidate_scores_are_length_normalised_log_likelihoods():
  rng = np.random.RandomState(2)
  logits = rng.randn(6, 4, 9)
  targets = rng.randint(0, 9, (6, 4))
  z = logits - logits.max(-1, keepdims=True)
  logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
  want_lp = np.take_along_axis(logp, targets[..., None], -1)[..., 0]
  lp = np.asarray(cal.token_logprobs(logits, targets))
  np.testing.assert_allclose(lp, want_lp, rtol=1e-5)
  lp_NKT = lp.reshape(2, 3, 4)
  mask = np.array([[[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]],
                   [[1, 1, 1, 0], [0, 0, 0, 0], [0, 1, 1, 0]]])
  lp_NKT = np.where(mask > 0, lp_NKT, -np.inf)  # padded positions may hold anything
  got = np.asarray(cal.candidate_scores(lp_NKT, mask))
  for n in range(2):
    for k in range(3):
      m = mask[n, k].astype(bool)
      want = lp_NKT[n, k][m].mean() if m.any() else -np.inf
      np.testing.assert_allclose(got[n, k], want, rtol=1e-5)


def test_first_token_bias_promotes_tokens_that_never_start_a_tuning_answer():
  bias = np.asarray(cal.first_token_bias(8, [1, 3, 3], 2.0))
  assert bias.shape == (8,) and bias.dtype == np.float32
  np.testing.assert_array_equal(bias, [2, 0, 2, 0, 2, 2, 2, 2])
  step1 = np.array([0.0, 5.0, 0.0, 1.0, 4.0, 0.0, 0.0, 0.0])  # token 4: never starts an answer
  assert np.argmax(step1) == 1 and np.argmax(step1 + bias) == 4


def test_calibration_bad_inputs_are_clear_errors():
  z = np.zeros((4, 5))
  seen = np.array([True, True, False, False, False])
  with pytest.raises(ValueError, match=r"fits neither \(C,\)"):
    cal.alg_gamma(z, np.zeros(4, int), seen[:4])
  with pytest.raises(ValueError, match=r"labels must be in \[0, 5\)"):
    cal.alg_gamma(z, np.array([0, 1, 5, 0]), seen)
  with pytest.raises(ValueError, match=r"labels must be \(4,\) integers"):
    cal.alg_gamma(z, np.zeros(3, int), seen)
  with pytest.raises(ValueError, match="no unseen class"):
    cal.alg_gamma(z, np.zeros(4, int), np.ones(5, bool))
  with pytest.raises(ValueError, match=r"\|S\| >= 2"):
    cal.alg_gamma(z, np.zeros(4, int), np.array([True, False, False, False, False]))
  with pytest.raises(ValueError, match="must be bool"):
    cal.calibrate(z, np.array([0, 1, 0, 0, 1]), 1.0)
  with pytest.raises(ValueError, match="disagree on C|does not broadcast"):
    cal.calibrate(z, seen[:3], 1.0)
  with pytest.raises(ValueError, match=r"token ids must be in \[0, 8\)"):
    cal.first_token_bias(8, [8], 1.0)
  with pytest.raises(ValueError, match=r"\(N, K, T\)"):
    cal.candidate_scores(np.zeros((2, 3, 4)), np.zeros((2, 3)))


def test_calibration_config():
  cfg = importlib.import_module("configs.methods.calibration").get_config()
  assert cfg.name == "calibration" and cfg.gamma is None and cfg.estimator == "alg"
