"""LoRASculpt vs float64 NumPy: top-k factor sparsity from T0, CMR value and gradient."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

import mllm_tune as mt
from mllm_tune.models import build_model, init_params
from mllm_tune.models.config import CausalLMConfig, LLMConfig
from mllm_tune import pytree as select
from mllm_tune.tuning.reparam.lorasculpt import topk_mask

CFG = LLMConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                num_kv_heads=2, head_dim=8)


def _setup(**kw):
  model = build_model(CausalLMConfig(llm=CFG))
  params = init_params(model, jax.random.key(0))
  method = mt.tuning.get("lorasculpt", rank=4, alpha=8.0, dropout=0.0, **kw)
  v = method.init_variables(jax.random.key(1), params)
  return model, params, method, v


def test_factors_are_sparsified_at_t0_and_stay_sparse_under_adam():
  model, params, method, v = _setup(rho=0.1, t0=3)
  ids = jnp.asarray(np.random.RandomState(0).randint(0, 64, (2, 9)))
  mask_tree = method.trainable(v)
  train, frozen = mt.tuning.partition(v, mask_tree)
  opt = mt.tuning.build_optimizer(method, v, mask_tree, train, optax.adamw(1e-2, weight_decay=0.1))
  state = opt.init(train)

  def loss(tr):
    logits = model.apply(mt.tuning.combine(tr, frozen), ids)
    return -jax.nn.log_softmax(logits)[..., 0].mean()

  @jax.jit
  def step(tr, st):
    upd, st = opt.update(jax.grad(loss)(tr), st, tr)
    return optax.apply_updates(tr, upd), st

  support = None
  for t in range(23):
    train, state = step(train, state)
    flat = select.flatten(train)
    factors = {k: np.asarray(x) for k, x in flat.items() if k.endswith(("lora_a", "lora_b"))}
    if t < 3:
      assert all((x != 0).mean() > 0.5 for k, x in factors.items() if k.endswith("lora_a"))
      continue
    if support is None:
      support = {k: x != 0 for k, x in factors.items()}
    for k, x in factors.items():
      per_layer = x.reshape(x.shape[0], -1)
      kmax = int(np.floor(0.1 * per_layer.shape[1]))
      assert ((per_layer != 0).sum(1) <= kmax).all(), k   # density <= target
      assert not (x[~support[k]]).any(), k                # masked entries never move
  assert any((support[k].reshape(2, -1).sum(1) == int(np.floor(0.1 * support[k][0].size))).all()
             for k in support)


def test_topk_mask_keeps_exactly_floor_rho_numel_per_layer():
  x = jax.random.normal(jax.random.key(0), (3, 40, 7))
  m = np.asarray(topk_mask(x, 0.1, stacked=True))
  assert (m.reshape(3, -1).sum(1) == 28).all()
  ax = np.abs(np.asarray(x)).reshape(3, -1)
  for i in range(3):
    assert ax[i][m[i].ravel()].min() >= ax[i][~m[i].ravel()].max()


def test_density_of_ba_matches_the_papers_formula():
  rng = jax.random.key(0)
  r, rho, d = 32, 0.1, 400
  ka, kb = jax.random.split(rng)
  a = jax.random.normal(ka, (d, r))
  b = jax.random.normal(kb, (r, d))
  a = jnp.where(topk_mask(a, rho, False), a, 0)
  b = jnp.where(topk_mask(b, rho, False), b, 0)
  density = float((np.abs(np.asarray(a @ b)) > 0).mean())
  np.testing.assert_allclose(density, 1 - (1 - rho * rho) ** r, rtol=0.05)


def test_cmr_value_and_gradient_match_numpy():
  model, params, method, v = _setup(cmr_lambda=0.5, cmr_omega=2.0)
  v["adapters"] = jax.tree_util.tree_map_with_path(
      lambda p, x: (jax.random.normal(jax.random.key(len(str(p))), x.shape) * 0.3
                    if p[-1].key == "lora_b" else x), v["adapters"])

  def reference(ad):
    total, n = 0.0, 0
    for name in ("q_proj", "k_proj", "v_proj"):
      k0 = np.asarray(params["llm"]["layers"]["attn"][name]["kernel"], np.float64)
      a = np.asarray(ad["llm"]["layers"]["attn"][name]["lora_a"], np.float64)
      b = np.asarray(ad["llm"]["layers"]["attn"][name]["lora_b"], np.float64)
      for l in range(2):
        p = k0[l] / np.linalg.norm(k0[l])
        m = np.tanh(2.0 * np.abs(1 / np.log(np.abs(p) + 1e-15)))
        total += np.linalg.norm(m * (a[l] @ b[l]))
        n += 1
    return 0.5 * total / n

  val = method.loss_terms(v, None, None)["cmr"]
  np.testing.assert_allclose(float(val), reference(v["adapters"]), rtol=1e-5)
  grad = jax.grad(lambda ad: method.loss_terms({"params": params, "adapters": ad}, None,
                                               None)["cmr"])(v["adapters"])
  # NumPy gradient for one layer/module: dL/dA = (λ/N) (M² ⊙ AB / ||M ⊙ AB||) Bᵀ
  k0 = np.asarray(params["llm"]["layers"]["attn"]["k_proj"]["kernel"][1], np.float64)
  a = np.asarray(v["adapters"]["llm"]["layers"]["attn"]["k_proj"]["lora_a"][1], np.float64)
  b = np.asarray(v["adapters"]["llm"]["layers"]["attn"]["k_proj"]["lora_b"][1], np.float64)
  m = np.tanh(2.0 * np.abs(1 / np.log(np.abs(k0 / np.linalg.norm(k0)) + 1e-15)))
  g_ab = m * m * (a @ b) / np.linalg.norm(m * (a @ b))
  np.testing.assert_allclose(
      np.asarray(grad["llm"]["layers"]["attn"]["k_proj"]["lora_a"][1]), 0.5 / 6 * g_ab @ b.T,
      rtol=1e-4, atol=1e-7)
  assert not np.asarray(grad["llm"]["layers"]["attn"]["o_proj"]["lora_a"]).any()  # not in CMR
