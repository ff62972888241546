"""Gradient top-k / FISH mask (docs/methods.md §2.8): the empirical Fisher of a linear softmax
equals its closed form (p - y)^2 x^2 from per-sample gradients (not the squared batch gradient), the
mask keeps exactly k entries of the candidates, `grad_abs` sums |batch gradients|."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mllm_tune as mt
from mllm_tune import pytree as select
from mllm_tune.tuning.selective.grad_topk import importance_scores, top_k_mask
from tests.helpers.tiny_models import SYNTHETIC_BATCH, synthetic_loss, tiny_lm

D, C = 5, 4


def _softmax_problem():
  rng = np.random.RandomState(0)
  w = rng.randn(D, C).astype(np.float32)
  batches = [{"x": rng.randn(n, D).astype(np.float32), "y": rng.randint(0, C, n)}
             for n in (3, 5)]
  return w, batches


def nll(variables, batch):
  """Mean -log p(y|x) of a linear softmax classifier `p = softmax(x W)`."""
  logits = batch["x"] @ variables["params"]["head"]["kernel"]
  logp = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.mean(jnp.take_along_axis(logp, batch["y"][:, None], axis=-1))


def _p_minus_y(w, batch):
  z = batch["x"].astype(np.float64) @ w.astype(np.float64)
  p = np.exp(z - z.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return p - np.eye(C)[batch["y"]]


def test_fisher_matches_linear_softmax_closed_form_and_differs_from_batch_squared():
  w, batches = _softmax_problem()
  variables = {"params": {"head": {"kernel": jnp.asarray(w)}}, "adapters": {}}
  candidates = {"params": {"head": {"kernel": True}}, "adapters": {}}
  fisher = importance_scores(nll, variables, batches, candidates)["params/head/kernel"]
  # closed form: d_W log p(y|x) = x (p - y)^T, squared and averaged over all N samples
  per_sample = [b["x"].astype(np.float64)[:, :, None] ** 2 * _p_minus_y(w, b)[:, None, :] ** 2
                for b in batches]
  ref = np.concatenate(per_sample).mean(0)
  np.testing.assert_allclose(fisher, ref, rtol=1e-5, atol=1e-6)
  # the usual bug: squaring batch-mean gradients gives something else
  batch_sq = np.mean([np.square((b["x"][:, :, None] * _p_minus_y(w, b)[:, None, :]).mean(0))
                      for b in batches], axis=0)
  assert np.abs(batch_sq - ref).max() > 0.1 * ref.max()
  # grad_abs: sum over batches of |batch gradient|
  gabs = importance_scores(nll, variables, batches, candidates, kind="grad_abs")
  ref_abs = sum(np.abs((b["x"][:, :, None] * _p_minus_y(w, b)[:, None, :]).mean(0))
                for b in batches)
  np.testing.assert_allclose(gabs["params/head/kernel"], ref_abs, rtol=1e-5, atol=1e-6)


def test_top_k_keeps_exactly_k_finite_entries_with_ties():
  scores = {"a": np.array([3.0, 1.0, 1.0, -np.inf]), "b": np.array([[1.0, 0.5], [2.0, 1.0]])}
  mask = top_k_mask(scores, density=4 / 7)  # 7 finite entries -> k = 4
  assert sum(int(m.sum()) for m in mask.values()) == 4
  assert mask["a"].tolist() == [True, True, True, False]  # ties at 1.0 broken in path order
  assert mask["b"].tolist() == [[False, False], [True, False]]
  with pytest.raises(mt.tuning.MethodError, match="density"):
    top_k_mask(scores, 0.0)


def test_method_mask_covers_only_candidates_and_has_k_entries():
  _, params, _ = tiny_lm()
  variables = {"params": params, "adapters": {}}
  method = mt.tuning.get("grad_topk", density=0.01, targets=r"llm/layers_1/mlp/.*")
  ready = method.prepare(synthetic_loss, variables, [SYNTHETIC_BATCH])
  assert method.mask is None and ready != method and hash(ready) != hash(method)
  assert ready == method.prepare(synthetic_loss, variables, [SYNTHETIC_BATCH])  # by content
  mask = ready.trainable(variables)
  n_candidates = 3 * 32 * 48  # gate, up, down of block 1
  _, n, _ = mt.tuning.trainable_table(variables, mask)
  assert n == round(0.01 * n_candidates)
  flat = select.flatten(mask)
  chosen = [np.asarray(m) for p, m in flat.items() if "/mlp/" in p and m is not False]
  assert chosen and all(m.shape[0] == 2 and not m[0].any() for m in chosen)  # block 0 excluded
  assert all(m is False for p, m in flat.items() if "/mlp/" not in p)
