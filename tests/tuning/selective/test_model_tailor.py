"""Model Tailor (docs/methods.md §2.6) against a float64 NumPy replica of the released sparsegpt.py
(one Linear), the uncompensated patch, the reconstruction error of the compensation sign, and
the block-by-block driver on a tiny LLaVA."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mllm_tune as mt
from mllm_tune import pytree as select
from mllm_tune.tuning.selective.model_tailor import (LINEARS, block_inputs_fn, block_pass_fn,
                                                     layer_slice, tailor_linear)
from tests.helpers.tiny_models import logits_fn, tiny_llava


def tailor_np(w_ft, w0, h, sparsity=0.9, block=128, damp=0.01, weights=(0.8, 0.2), sign=-1.0,
              compensate=True):
  """float64 replica of `SparseGPT.fasterprune` as used by Model Tailor (sign +1 = the code)."""
  h = h.astype(np.float64).copy()
  dead = np.diag(h) == 0
  h[dead, dead] = 1.0
  h += np.eye(len(h)) * damp * np.mean(np.diag(h))
  u = np.linalg.cholesky(np.linalg.inv(h)).T  # upper: H^-1 = U^T U
  w = w_ft.astype(np.float64).copy()
  w0 = w0.astype(np.float64)
  changes = np.abs(w - w0)
  resets = []
  for i1 in range(0, w.shape[1], block):
    i2 = min(i1 + block, w.shape[1])
    w1, u1 = w[:, i1:i2].copy(), u[i1:i2, i1:i2]
    z = lambda x: (x - x.mean(1, keepdims=True)) / x.std(1, ddof=1, keepdims=True)
    score = weights[0] * z(changes[:, i1:i2]) + weights[1] * z(w1 ** 2 / np.diag(u1)[None] ** 2)
    reset = score <= np.quantile(score, sparsity)
    q1, e1 = np.zeros_like(w1), np.zeros_like(w1)
    for i in range(i2 - i1):
      col = w1[:, i].copy()
      q = np.where(reset[:, i], w0[:, i1 + i], col)
      e = (col - q) / u1[i, i]
      if compensate:
        w1[:, i:] += sign * np.outer(e, u1[i, i:])
      q1[:, i], e1[:, i] = q, e
    w[:, i1:i2] = q1
    if compensate:
      w[:, i2:] += sign * e1 @ u[i1:i2, i2:]
    resets.append(reset)
  return w, np.concatenate(resets, 1)


def _linear_problem(d_out=6, d_in=20, n_tok=200, seed=0):
  rng = np.random.RandomState(seed)
  w0 = rng.randn(d_out, d_in).astype(np.float32)
  w_ft = (w0 + rng.randn(d_out, d_in) * 0.3).astype(np.float32)
  x_IN = (rng.randn(d_in, n_tok) * rng.rand(d_in, 1) * 2).astype(np.float32)
  return w_ft, w0, x_IN, (2.0 / n_tok) * x_IN @ x_IN.T


@pytest.mark.parametrize("sign", [-1.0, 1.0])
def test_one_linear_matches_float64_numpy_replica(sign):
  w_ft, w0, _, h = _linear_problem()
  ours, reset = tailor_linear(w_ft, w0, h, block_size=8, compensation_sign=sign)
  reset = np.asarray(reset)
  ref, ref_reset = tailor_np(w_ft, w0, h, block=8, sign=sign)
  np.testing.assert_array_equal(reset, ref_reset)
  np.testing.assert_allclose(np.asarray(ours), ref, rtol=1e-5, atol=1e-5)


def test_without_compensation_kept_is_ft_rest_is_pre_and_ten_percent_per_block():
  w_ft, w0, _, h = _linear_problem(d_out=10, d_in=36)
  block = 16
  ours, reset = (np.asarray(x) for x in tailor_linear(w_ft, w0, h, block_size=block,
                                                       compensate=False))
  np.testing.assert_array_equal(ours[~reset], w_ft[~reset])
  np.testing.assert_array_equal(ours[reset], w0[reset])
  kept = [int((~reset[:, i1:i1 + block]).sum()) for i1 in range(0, 36, block)]
  assert kept == [16, 16, 4]  # exactly 10% of 10x16, 10x16 and 10x4 entries


def test_obs_sign_lowers_reconstruction_error_and_the_code_sign_raises_it():
  w_ft, w0, x_IN, h = _linear_problem(d_out=12, d_in=32, n_tok=128, seed=1)
  err = lambda w: float(np.linalg.norm((w_ft - np.asarray(w)) @ x_IN))
  plain = err(tailor_linear(w_ft, w0, h, block_size=16, compensate=False)[0])
  obs = err(tailor_linear(w_ft, w0, h, block_size=16, compensation_sign=-1.0)[0])
  code = err(tailor_linear(w_ft, w0, h, block_size=16, compensation_sign=1.0)[0])
  assert obs <= plain < code


def test_driver_tailors_changed_blocks_in_order_with_tailored_inputs():
  model, params, batch = tiny_llava(square=True)
  rng = np.random.RandomState(0)
  noise = lambda x: x + jnp.asarray(rng.randn(*x.shape).astype(np.float32) * 0.05)
  ft = jax.tree.map(lambda x: x, params)
  ft["projector"] = jax.tree.map(noise, params["projector"])
  ft["llm"]["layers"] = jax.tree.map(  # blocks 1 and 2 fine-tuned, block 0 untouched
      lambda x: x.at[1:].set(noise(x[1:])), params["llm"]["layers"])
  method = mt.tuning.get("model_tailor", block_size=16)  # 2 column blocks per Linear
  out = method.tailor(model, params, ft, [batch])
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), out["projector"],
                                   params["projector"]))  # reset to theta0, as the code
  flat_out, flat_ft = select.flatten(out["llm"]["layers"]), select.flatten(ft["llm"]["layers"])
  for p, x in flat_out.items():
    x, y = np.asarray(x), np.asarray(flat_ft[p])
    np.testing.assert_array_equal(x[0], y[0])      # untouched block
    if p.endswith("_proj/kernel"):
      assert not np.array_equal(x[1:], y[1:]), p   # tailored linears
    else:
      np.testing.assert_array_equal(x, y)          # norms keep theta_ft
  # block 2 was tailored on the outputs of the *tailored* block 1
  reset_proj = {**ft, "projector": params["projector"]}
  state = block_inputs_fn(model)(reset_proj, batch)
  block_pass = block_pass_fn(model.config.llm)
  tm = np.ones(batch["input_ids"].shape, bool)
  h1 = block_pass(layer_slice(ft["llm"]["layers"], 0), state, tm, 0)[0]
  state1 = (h1, *state[1:])
  tailored1 = layer_slice(out["llm"]["layers"], 1)
  for inputs_from, expect_equal in ((tailored1, True), (layer_slice(ft["llm"]["layers"], 1),
                                                        False)):
    h2 = block_pass(inputs_from, state1, tm, 1)[0]
    _, grams = block_pass(layer_slice(ft["llm"]["layers"], 2), (h2, *state[1:]), tm, 2)
    p2 = method.tailor_linears(layer_slice(ft["llm"]["layers"], 2),
                               layer_slice(params["llm"]["layers"], 2), grams)
    same = all(np.allclose(np.asarray(select.flatten(p2)[f"{n}/kernel"]),
                           np.asarray(flat_out[f"{n}/kernel"])[2], atol=1e-5) for n in LINEARS)
    assert same == expect_equal
  # the tailored model runs, and sits between theta0 and theta_ft
  logits = logits_fn(model)
  ours, pre, fine = (np.asarray(logits({"params": p, "adapters": {}}, batch))
                     for p in (out, params, ft))
  assert 0 < np.abs(ours - pre).max() and 0 < np.abs(ours - fine).max()


def test_bad_options_are_refused():
  with pytest.raises(mt.tuning.MethodError, match="compensation_sign"):
    mt.tuning.get("model_tailor", compensation_sign=0.5)
  model, params, batch = tiny_llava()
  with pytest.raises(mt.tuning.MethodError, match=r"layers \[7\] out of range"):
    mt.tuning.get("model_tailor", layers=(7,)).tailor(model, params, params, [batch])
