"""`layers.attention` (jax.nn.dot_product_attention) against a float64 NumPy formula, and the
`attention_impl` runtime field."""
from __future__ import annotations

import numpy as np
import pytest

from mllm_tune.models import config as mc
from mllm_tune.models.layers import attention


def _numpy_attention(q, k, v, mask):
  b, t, n, h = q.shape
  g = n // k.shape[2]
  k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)  # head i uses KV head i // g
  logits = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(h)
  logits = np.where(mask[:, None], logits, -np.inf)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum("bnts,bsnh->btnh", p, v)


def test_grouped_masked_attention_equals_float64_numpy():
  rng = np.random.default_rng(0)
  b, t, s, n, kh, h = 2, 5, 7, 6, 2, 8
  q = rng.normal(size=(b, t, n, h)).astype(np.float32)
  k = rng.normal(size=(b, s, kh, h)).astype(np.float32)
  v = rng.normal(size=(b, s, kh, h)).astype(np.float32)
  mask = rng.random((b, t, s)) < 0.6
  mask[:, :, 0] = True  # every row sees at least one key ...
  mask[1, 3] = False    # ... except one padding row
  got = np.asarray(attention(q, k, v, mask))
  rows = mask.any(-1)
  want = _numpy_attention(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64),
                          np.where(rows[..., None], mask, True))
  np.testing.assert_allclose(got[rows], want[rows], rtol=1e-5, atol=1e-6)
  assert np.isfinite(got).all()  # the fully masked row: finite, not NaN
  full = np.asarray(attention(q, k, v, None))
  np.testing.assert_allclose(full, _numpy_attention(q, k, v, np.ones((b, t, s), bool)),
                             rtol=1e-5, atol=1e-6)


def test_attention_impl_is_a_runtime_field_of_both_towers():
  cfg = mc.with_runtime(mc.LlavaConfig(), attention_impl="cudnn", remat_policy="full")
  assert cfg.llm.attention_impl == cfg.vision.attention_impl == "cudnn"
  assert cfg.llm.remat_policy == "full"
  with pytest.raises(mc.ConfigError, match="model.attention_impl must be one of"):
    mc.with_runtime(mc.LlavaConfig(), attention_impl="flash")
  with pytest.raises(mc.ConfigError, match="not runtime fields"):
    mc.with_runtime(mc.LlavaConfig(), num_layers=3)


def test_attention_impl_reaches_the_model_from_the_train_config():
  from configs import base
  from mllm_tune.train import setup
  from mllm_tune.tuning.fisher import model_config_hash
  c = base.get_config().model
  c.tiny.vision_layers = 1
  c.attention_impl = "cudnn"
  cfg = setup.tiny_model_config(c)
  assert cfg.llm.attention_impl == cfg.vision.attention_impl == "cudnn"
  c.attention_impl = "xla"  # not part of the architecture: a Fisher still fits
  assert model_config_hash(setup.tiny_model_config(c)) == model_config_hash(cfg)
