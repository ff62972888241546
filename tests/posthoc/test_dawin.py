"""DaWin (dawin.py): entropies, lambda and its offset version, the Beta mixture, interpolation.

References are float64 NumPy written here, independently of the implementation."""
from __future__ import annotations

import importlib
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mllm_tune.posthoc import dawin
from mllm_tune.posthoc import merging


def _entropy(logits: np.ndarray) -> np.ndarray:
  z = np.asarray(logits, np.float64)
  p = np.exp(z - z.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return -(p * np.log(np.where(p > 0, p, 1.0))).sum(-1)


def test_lambda_matches_the_formula_on_hand_computed_logits():
  # [0, ln 3] -> p = (1/4, 3/4): H = -(1/4 ln 1/4 + 3/4 ln 3/4) = 0.5623351446188083
  h = dawin.entropy_from_logits(jnp.array([[0.0, np.log(3.0)], [0.0, 0.0]]))
  np.testing.assert_allclose(h, [0.5623351446188083, np.log(2.0)], rtol=1e-6)
  rng = np.random.RandomState(0)
  l0, lft = rng.randn(16, 10) * 2, rng.randn(16, 10) * 3
  h0, hft = _entropy(l0), _entropy(lft)
  np.testing.assert_allclose(dawin.entropy_from_logits(l0), h0, rtol=1e-5)
  lam = dawin.dawin_lambda(dawin.entropy_from_logits(l0), dawin.entropy_from_logits(lft))
  np.testing.assert_allclose(lam, np.exp(-hft) / (np.exp(-h0) + np.exp(-hft)), rtol=1e-5)
  # offset adjustment: b, w from the set's statistics (torch's std: ddof 1)
  b = (h0.std(ddof=1) / h0.mean() + hft.std(ddof=1) / hft.mean()) / 2
  w = (h0.mean() + hft.mean()) / h0.mean()
  np.testing.assert_allclose(dawin.offset_coefficients(h0, hft), (b, w), rtol=1e-5)
  want = (np.exp(-hft) + b / w) / (np.exp(-h0) + np.exp(-hft) + b)
  np.testing.assert_allclose(dawin.dawin_lambda_offset(h0, hft), want, rtol=1e-5)
  np.testing.assert_allclose(dawin.dawin_lambda_offset(h0, hft, b=0.0, w=1.0),
                             dawin.dawin_lambda(h0, hft), rtol=1e-6)
  assert not np.allclose(want, dawin.dawin_lambda(h0, hft), atol=1e-3)


def test_lambda_tends_to_one_when_ft_is_confident_and_theta0_uniform():
  v = 1000
  uniform_BTV = jnp.zeros((2, 3, v))
  confident_BTV = jnp.zeros((2, 3, v)).at[..., 5].set(100.0)
  mask_BT = jnp.ones((2, 3))
  h0 = dawin.sequence_entropy(uniform_BTV, mask_BT)
  hft = dawin.sequence_entropy(confident_BTV, mask_BT)
  np.testing.assert_allclose(h0, np.log(v), rtol=1e-5)
  lam = np.asarray(dawin.dawin_lambda(h0, hft))
  np.testing.assert_allclose(lam, 1 / (1 + 1 / v), rtol=1e-5)  # e^-0 / (e^-ln V + e^-0)
  assert (lam > 0.99).all()
  assert (np.asarray(dawin.dawin_lambda(hft, h0)) < 0.01).all()  # the other way round -> 0


def test_sequence_entropy_averages_only_answer_tokens():
  rng = np.random.RandomState(1)
  logits = rng.randn(3, 5, 7) * 2
  mask = np.array([[0, 1, 1, 1, 0], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]])
  got = np.asarray(dawin.sequence_entropy(logits, mask))
  h = _entropy(logits)
  np.testing.assert_allclose(got[:2], [h[0, 1:4].mean(), h[1, 0]], rtol=1e-5)
  assert got[2] == 0.0
  with pytest.raises(ValueError, match=r"logits \(B, T, V\) and mask \(B, T\)"):
    dawin.sequence_entropy(logits, mask[:, :4])


def test_beta_mixture_recovers_synthetic_modes():
  rng = np.random.RandomState(2)
  means, sizes, conc = np.array([0.15, 0.5, 0.85]), np.array([200, 300, 500]), 80.0
  lam = np.concatenate([rng.beta(m * conc, (1 - m) * conc, n) for m, n in zip(means, sizes)])
  truth = np.repeat(np.arange(3), sizes)
  perm = rng.permutation(lam.size)
  mix = dawin.fit_beta_mixture(lam[perm], 3)
  np.testing.assert_allclose(mix.means_K, means, atol=0.02)
  np.testing.assert_allclose(mix.weights_K, sizes / sizes.sum(), atol=0.03)
  np.testing.assert_allclose(mix.a_K / (mix.a_K + mix.b_K), mix.means_K)
  assert (mix.assign_N == truth[perm]).mean() > 0.97
  coefs, mix2 = dawin.dawin_coefficients(-np.log(lam[perm]), -np.log1p(-lam[perm]),
                                         offset_adjustment=False, num_components=3)
  # H_0 = -ln(l), H_ft = -ln(1 - l)  =>  lambda = (1 - l) / (l + 1 - l) = 1 - l
  np.testing.assert_allclose(np.sort(mix2.means_K), np.sort(1 - means), atol=0.02)
  assert set(np.unique(coefs)) <= set(mix2.means_K)
  raw, none = dawin.dawin_coefficients(np.ones(4), np.zeros(4), False, None)
  assert none is None and np.allclose(raw, 1 / (1 + np.exp(-1.0)))


def test_dawin_interpolate_is_wise_ft_at_lambda():
  rng = np.random.RandomState(3)
  t0 = {"llm": {"w": jnp.asarray(rng.randn(4, 3), jnp.float32)}}
  t1 = {"llm": {"w": jnp.asarray(rng.randn(4, 3), jnp.float32)}}
  got = dawin.dawin_interpolate(t0, t1, np.float32(0.3))["llm"]["w"]
  want = 0.7 * np.asarray(t0["llm"]["w"], np.float64) + 0.3 * np.asarray(t1["llm"]["w"])
  np.testing.assert_allclose(got, want, rtol=1e-6)
  assert np.array_equal(got, merging.wise_ft(t0, t1, 0.3)["llm"]["w"])


def test_dawin_bad_inputs_are_clear_errors():
  with pytest.raises(ValueError, match="entropy shapes differ"):
    dawin.dawin_lambda(np.ones(3), np.ones(4))
  with pytest.raises(ValueError, match="temperature must be > 0"):
    dawin.entropy_from_logits(np.ones((2, 3)), temperature=0.0)
  with pytest.raises(ValueError, match="2 samples cannot fit 3 mixture components"):
    dawin.fit_beta_mixture(np.array([0.2, 0.4]), 3)
  with pytest.raises(ValueError, match="at least 2 samples"):
    dawin.offset_coefficients(np.ones(1), np.ones(1))


def test_dawin_config_names_its_function_arguments():
  cfg = importlib.import_module("configs.methods.dawin").get_config()
  assert cfg.name == "dawin" and cfg.num_components == 3 and cfg.offset_adjustment
  params = set(inspect.signature(dawin.dawin_coefficients).parameters)
  assert set(cfg.to_dict()) - {"name", "max_answer_tokens"} <= params
