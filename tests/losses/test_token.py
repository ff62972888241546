"""`train.step.token_ce` (shifted targets, custom-VJP NLL) against float64 NumPy: the summed
NLL, the counts, and the gradient w.r.t. the logits (softmax - one-hot on supervised
positions, zero on the last position and on unsupervised ones)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mllm_tune.train.step import token_ce


def _numpy_ce(logits, ids, mask):
  x = logits[:, :-1].astype(np.float64)
  t, w = ids[:, 1:], mask[:, 1:].astype(np.float64)
  m = x.max(-1, keepdims=True)
  logz = (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))[..., 0]
  picked = np.take_along_axis(x, t[..., None], -1)[..., 0]
  p = np.exp(x - logz[..., None])
  grad = np.zeros(logits.shape)
  grad[:, :-1] = (p - np.eye(x.shape[-1])[t]) * w[..., None]
  correct = ((x.argmax(-1) == t) * w).sum()
  return ((logz - picked) * w).sum(), w.sum(), correct, grad


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_token_ce_value_and_gradient_equal_float64_numpy(dtype):
  rng = np.random.default_rng(0)
  b, t, v = 3, 6, 11
  logits = rng.normal(size=(b, t, v)).astype(np.float32) * 3
  logits = np.asarray(jnp.asarray(logits, dtype).astype(jnp.float32))  # representable in dtype
  ids = rng.integers(0, v, size=(b, t)).astype(np.int32)
  ids[0, 1:] = logits[0, :-1].argmax(-1)  # some correct predictions
  mask = (rng.random((b, t)) < 0.7).astype(np.int32)
  nll, n, correct = token_ce(jnp.asarray(logits, dtype), ids, mask)
  want_nll, want_n, want_correct, want_grad = _numpy_ce(logits, ids, mask)
  tol = 1e-5 if dtype == jnp.float32 else 1e-2
  np.testing.assert_allclose(float(nll), want_nll, rtol=tol)
  assert float(n) == want_n and float(correct) == want_correct
  grad = jax.grad(lambda x: token_ce(x, ids, mask)[0])(jnp.asarray(logits, dtype))
  assert grad.dtype == dtype
  np.testing.assert_allclose(np.asarray(grad.astype(jnp.float32)), want_grad,
                             atol=1e-6 if dtype == jnp.float32 else 1e-2)
  assert not np.asarray(grad[:, -1].astype(jnp.float32)).any()  # the last position: no target
