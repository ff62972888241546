"""DaWin (Oh et al., ICLR 2025; naver-ai/dawin `dawin_rft/main_dawin.py`, `mixturemodel.py`):
training-free per-sample WiSE-FT, docs/methods.md §6.2.

Each model's prediction entropy H(x) is a proxy of its expertise on x:
  lambda(x) = e^{-H_ft} / (e^{-H_0} + e^{-H_ft}) = sigmoid(H_0 - H_ft),
  theta(x) = (1 - lambda) theta0 + lambda theta_ft.
Offset adjustment (the released scripts' `--offset-adjustment`), from test-set statistics:
  b = (CV(H_0) + CV(H_ft)) / 2 with CV = std / mean (torch's unbiased std, ddof = 1),
  w = (mean H_0 + mean H_ft) / mean H_0,
  lambda = (e^{-H_ft} + b / w) / (e^{-H_0} + e^{-H_ft} + b).
Speed-up: a K = 3 Beta mixture fitted to {lambda(x)}; each sample uses its component's mean
a / (a + b), so only K merged models are built. Generative VQA [choice]: H = mean token entropy of
each model over its own greedy answer (`sequence_entropy`); multiple choice: `entropy_from_logits`
on the option letters' logits.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from scipy.special import betaln, logsumexp

from mllm_tune.eval.sampling import entropy_from_logits  # noqa: F401  (DaWin's H(x))
from mllm_tune.posthoc.merging import AlphaRules, Params, wise_ft


# ----------------------------------------------------------------------------- entropies
def sequence_entropy(logits_BTV: jax.Array, mask_BT: jax.Array) -> jax.Array:
  """(B,) mean token entropy over the answer tokens (`mask_BT` 1 where logits_BTV[b, t] predicts
  a generated answer token); 0 for a row without any."""
  if np.ndim(logits_BTV) != 3 or np.shape(mask_BT) != np.shape(logits_BTV)[:2]:
    raise ValueError(f"dawin: sequence_entropy needs logits (B, T, V) and mask (B, T), got "
                     f"{np.shape(logits_BTV)} and {np.shape(mask_BT)}")
  h_BT = entropy_from_logits(logits_BTV)
  m_BT = jnp.asarray(mask_BT, jnp.float32)
  return jnp.sum(h_BT * m_BT, axis=1) / jnp.maximum(jnp.sum(m_BT, axis=1), 1.0)


# ----------------------------------------------------------------------------- coefficients
def _check_pair(h0_N, hft_N) -> tuple[jax.Array, jax.Array]:
  if np.shape(h0_N) != np.shape(hft_N):
    raise ValueError(f"dawin: entropy shapes differ: H_0 {np.shape(h0_N)} vs H_ft "
                     f"{np.shape(hft_N)}")
  return jnp.asarray(h0_N, jnp.float32), jnp.asarray(hft_N, jnp.float32)


def dawin_lambda(h0_N: jax.Array, hft_N: jax.Array) -> jax.Array:
  """`e^{-H_ft} / (e^{-H_0} + e^{-H_ft})`, computed as `sigmoid(H_0 - H_ft)` (no underflow)."""
  h0, hft = _check_pair(h0_N, hft_N)
  return jax.nn.sigmoid(h0 - hft)


def offset_coefficients(h0_N: jax.Array, hft_N: jax.Array) -> tuple[float, float]:
  """(b, w): b = (CV(H_0) + CV(H_ft)) / 2 (ddof-1 std, as torch), w = (mean H_0 + mean H_ft) /
  mean H_0, over the evaluation set."""
  h0, hft = (np.asarray(h, np.float64) for h in _check_pair(h0_N, hft_N))
  if h0.size < 2:
    raise ValueError("dawin: the offset needs entropies of at least 2 samples")
  if h0.mean() <= 0 or hft.mean() <= 0:
    raise ValueError("dawin: the offset needs positive mean entropies")
  cv = lambda h: h.std(ddof=1) / h.mean()  # noqa: E731
  return float((cv(h0) + cv(hft)) / 2), float((h0.mean() + hft.mean()) / h0.mean())


def dawin_lambda_offset(h0_N: jax.Array, hft_N: jax.Array, b: float | None = None,
                        w: float | None = None) -> jax.Array:
  """`(e^{-H_ft} + b / w) / (e^{-H_0} + e^{-H_ft} + b)`; b, w from `offset_coefficients` when
  not given (b = 0 recovers `dawin_lambda`)."""
  h0, hft = _check_pair(h0_N, hft_N)
  if b is None or w is None:
    b_est, w_est = offset_coefficients(h0, hft)
    b, w = b_est if b is None else b, w_est if w is None else w
  e0, eft = jnp.exp(-h0), jnp.exp(-hft)
  return (eft + b / w) / (e0 + eft + b)


# ----------------------------------------------------------------------------- Beta mixture
class BetaMixture(NamedTuple):
  """K-component Beta mixture, components sorted by mean."""
  weights_K: np.ndarray
  a_K: np.ndarray
  b_K: np.ndarray
  means_K: np.ndarray     # a / (a + b): the interpolation coefficient of each component
  assign_N: np.ndarray    # int, most probable component of each sample
  mean_log_lik: float


def _log_probs_NK(x_N, a_K, b_K, w_K):
  return ((a_K - 1) * np.log(x_N[:, None]) + (b_K - 1) * np.log1p(-x_N[:, None])
          - betaln(a_K, b_K) + np.log(w_K))


def _m_step(x_N, r_NK, eps):
  """Weighted method of moments (as `mixturemodel.py`): variance capped at m (1 - m) / 4."""
  counts = r_NK.sum(0) + 10 * np.finfo(np.float64).eps
  m = np.clip((r_NK * x_N[:, None]).sum(0) / counts, eps, 1 - eps)
  var = (r_NK * x_N[:, None] ** 2).sum(0) / counts - m ** 2
  var = np.minimum(np.maximum(var, 0.0), m * (1 - m) / 4) + 10 * np.finfo(np.float64).eps
  s = m * (1 - m) / var - 1
  return counts / counts.sum(), s * m, s * (1 - m)


def fit_beta_mixture(lam_N, num_components: int = 3, max_iter: int = 1000, tol: float = 1e-4,
                     eps: float = 1e-6) -> BetaMixture:
  """EM for a 1-D Beta mixture (float64 NumPy), as DaWin's `BetaMixtureModel`: E-step exact
  responsibilities, M-step weighted method of moments; stops when the mean log-likelihood moves
  by < tol. [choice] Deterministic init (the reference uses k-means with 3 seeds): 1-D k-means
  started at the K quantile midpoints, its hard labels as initial responsibilities. Values are
  clipped to [eps, 1 - eps]."""
  x = np.clip(np.asarray(lam_N, np.float64).reshape(-1), eps, 1 - eps)
  k = int(num_components)
  if k < 1:
    raise ValueError(f"dawin: num_components must be >= 1, got {num_components}")
  if x.size < k:
    raise ValueError(f"dawin: {x.size} samples cannot fit {k} mixture components")
  if not np.all(np.isfinite(x)):
    raise ValueError("dawin: lambdas must be finite")
  centers = np.quantile(x, (np.arange(k) + 0.5) / k)
  for _ in range(100):
    lab = np.argmin(np.abs(x[:, None] - centers), axis=1)
    new = np.array([x[lab == j].mean() if np.any(lab == j) else centers[j] for j in range(k)])
    if np.allclose(new, centers):
      break
    centers = new
  w, a, b = _m_step(x, np.eye(k)[lab], eps)
  ll = -np.inf
  for _ in range(max_iter):
    lp = _log_probs_NK(x, a, b, w)
    norm = logsumexp(lp, axis=1)
    prev, ll = ll, float(norm.mean())
    w, a, b = _m_step(x, np.exp(lp - norm[:, None]), eps)
    if abs(ll - prev) < tol:
      break
  order = np.argsort(a / (a + b))
  w, a, b = w[order], a[order], b[order]
  lp = _log_probs_NK(x, a, b, w)
  return BetaMixture(w, a, b, a / (a + b), np.argmax(lp, axis=1),
                     float(logsumexp(lp, axis=1).mean()))


# ----------------------------------------------------------------------------- end to end
def dawin_coefficients(h0_N, hft_N, offset_adjustment: bool = True,
                       num_components: int | None = 3) -> tuple[np.ndarray, BetaMixture | None]:
  """Per-sample interpolation coefficients (N,) and the mixture: lambda (offset-adjusted when
  asked), replaced by its Beta-mixture component mean when `num_components` is set."""
  lam = (dawin_lambda_offset(h0_N, hft_N) if offset_adjustment else dawin_lambda(h0_N, hft_N))
  lam = np.asarray(lam, np.float64)
  if not num_components:
    return lam, None
  mix = fit_beta_mixture(lam, num_components)
  return mix.means_K[mix.assign_N], mix


def dawin_interpolate(theta0: Params, theta_ft: Params, lam: float,
                      alphas: AlphaRules | None = None) -> Params:
  """`(1 - lambda) theta0 + lambda theta_ft` (one sample's or one component's model), via
  `merging.wise_ft`."""
  return wise_ft(theta0, theta_ft, float(lam), alphas)


__all__ = ["entropy_from_logits", "sequence_entropy", "dawin_lambda", "offset_coefficients",
           "dawin_lambda_offset", "BetaMixture", "fit_beta_mixture", "dawin_coefficients",
           "dawin_interpolate"]
