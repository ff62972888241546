"""SPIDER (docs/methods.md §2.5) against a float64 NumPy replica of the released code's update: 5
clipped-SGD steps on a random quadratic, per-tensor (per-layer when stacked) statistics."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

import mllm_tune as mt
from mllm_tune import pytree as select
from mllm_tune.tuning.selective.spider import challenge_ratio, importance, spider_transform
from tests.helpers.tiny_models import SYNTHETIC_BATCH, synthetic_loss, tiny_llava

LR, MAX_NORM, STEPS = 0.3, 1.0, 5


def psi_np(x, per_layer):
  """The code's `calculate_rank` per tensor: 0 if all zero, else sigmoid of the z-score."""
  if per_layer:
    return np.stack([psi_np(xi, False) for xi in x])
  a = np.abs(x)
  if np.all(a == 0):
    return np.zeros_like(a)
  return 1.0 / (1.0 + np.exp(-(a - a.mean()) / a.std(ddof=1)))


def ratio_np(i_pre, i_ft, per_layer):
  if per_layer:
    return np.stack([ratio_np(p, f, False) for p, f in zip(i_pre, i_ft)])
  c = np.where(i_ft > i_pre, i_ft / (i_pre + i_ft), 0.0)
  pos = c[c != 0]
  return np.minimum(1.0, c / pos.mean()) if pos.size else c


def _problem():
  rng = np.random.RandomState(0)
  shapes = {"params/llm/layers/attn/w": (3, 4, 5), "params/projector/k": (6, 4)}
  theta0 = {p: rng.randn(*s) for p, s in shapes.items()}
  target = {p: rng.randn(*s) * 2 for p, s in shapes.items()}
  hess = {}
  for p, s in shapes.items():
    m = rng.randn(int(np.prod(s)), int(np.prod(s)))
    hess[p] = m @ m.T / m.shape[0] + np.eye(m.shape[0])
  return shapes, theta0, target, hess


def _grad_np(theta, target, hess):
  return {p: (hess[p] @ (theta[p] - target[p]).reshape(-1)).reshape(theta[p].shape)
          for p in theta}


def test_five_clipped_sgd_steps_match_numpy_replica():
  shapes, theta0, target, hess = _problem()
  # NumPy float64 replica of SPIDER.py: clip -> optimizer.step -> G += g -> c -> combine
  theta = {p: x.copy() for p, x in theta0.items()}
  g_sum = {p: np.zeros_like(x) for p, x in theta0.items()}
  clipped_any, trajectory = False, []
  for _ in range(STEPS):
    g = _grad_np(theta, target, hess)
    norm = np.sqrt(sum((x ** 2).sum() for x in g.values()))
    clipped_any |= norm > MAX_NORM
    g = {p: x * min(1.0, MAX_NORM / norm) for p, x in g.items()}
    cs = {}
    for p in theta:
      stacked = p.startswith("params/llm/layers/")
      g_sum[p] = g_sum[p] + g[p]
      cs[p] = ratio_np(psi_np(theta0[p], stacked), psi_np(g_sum[p], stacked), stacked)
      theta[p] = theta0[p] + cs[p] * (theta[p] - LR * g[p] - theta0[p])
    trajectory.append(({p: x.copy() for p, x in theta.items()}, cs))
  assert clipped_any
  # ours: fp32 optax
  tx = spider_transform(optax.sgd(LR), None, MAX_NORM)
  params = select.unflatten({p: jnp.asarray(x, jnp.float32) for p, x in theta0.items()})
  state, update = tx.init(params), jax.jit(tx.update)
  for ref_theta, cs in trajectory:
    theta_np = {p: np.asarray(x, np.float64) for p, x in select.flatten(params).items()}
    grads = select.unflatten({p: jnp.asarray(x, jnp.float32)
                              for p, x in _grad_np(theta_np, target, hess).items()})
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
    for p, x in select.flatten(params).items():
      np.testing.assert_allclose(np.asarray(x), ref_theta[p], rtol=1e-5, atol=1e-5, err_msg=p)
  for p, c in cs.items():
    assert 0.0 <= c.min() and c.max() <= 1.0 and (c == 0).any() and (c > 0).any()
  # entries whose fine-tuning importance does not beat pre-training importance sit at theta0
  final = select.flatten(params)
  for p, c in cs.items():
    reset = c == 0
    np.testing.assert_allclose(np.asarray(final[p])[reset], theta0[p][reset], atol=1e-6)
    assert np.abs(np.asarray(final[p])[~reset] - theta0[p][~reset]).min() > 0


def test_importance_and_ratio_match_numpy_per_layer_and_edge_cases():
  rng = np.random.RandomState(1)
  x = rng.randn(3, 7, 2)
  x[1] = 0.0  # an all-zero layer has importance 0 (the code's `calculate_rank`)
  np.testing.assert_allclose(np.asarray(importance(jnp.asarray(x, jnp.float32), True)),
                             psi_np(x, True), rtol=1e-5, atol=1e-6)
  i_pre, i_ft = rng.rand(3, 7, 2), rng.rand(3, 7, 2)
  i_ft[2] = 0.0  # no winner in layer 2 -> c = 0 there
  c = np.asarray(challenge_ratio(jnp.asarray(i_pre), jnp.asarray(i_ft), True))
  np.testing.assert_allclose(c, ratio_np(i_pre, i_ft, True), rtol=1e-5, atol=1e-6)
  assert (c[2] == 0).all()


def test_composed_with_freeze_spider_owns_only_its_leaves():
  """spider on the last LLM block + plain tuning of the projector: the projector follows the
  (clipped) inner optimizer, frozen layers of stacked leaves never move."""
  _, params, _ = tiny_llava()
  method = mt.tuning.compose(mt.tuning.get("spider", k=1, max_grad_norm=0.5),
                             mt.tuning.get("freeze", preset="projector"))
  variables = method.init_variables(jax.random.key(0), params)
  mask = method.trainable(variables)
  trained, frozen = mt.tuning.partition(variables, mask)
  opt = mt.tuning.build_optimizer(method, variables, mask, trained, optax.sgd(LR))
  grad = jax.jit(jax.grad(lambda t: synthetic_loss(mt.tuning.combine(t, frozen),
                                                    SYNTHETIC_BATCH)))
  g = grad(trained)
  updates, _ = jax.jit(opt.update)(g, opt.init(trained), trained)
  new = optax.apply_updates(trained, updates)
  # expected projector step: SGD on the gradient clipped jointly with spider's masked gradient
  flat_g = select.flatten(g)
  pm = mt.tuning.api.partial_masks(mask, trained)
  masked = {p: np.where(np.broadcast_to(pm[p], x.shape), x, 0) if pm.get(p) is not None
            else np.asarray(x) for p, x in flat_g.items()}
  norm = np.sqrt(sum(float((np.asarray(x, np.float64) ** 2).sum()) for x in masked.values()))
  scale = min(1.0, 0.5 / norm)
  assert scale < 1.0
  k = "params/projector/linear_1/kernel"
  np.testing.assert_allclose(np.asarray(select.flatten(new)[k]),
                             np.asarray(select.flatten(trained)[k]) - LR * scale * masked[k],
                             rtol=1e-5, atol=1e-6)
  q_new = np.asarray(new["params"]["llm"]["layers"]["attn"]["q_proj"]["kernel"])
  q_old = np.asarray(trained["params"]["llm"]["layers"]["attn"]["q_proj"]["kernel"])
  np.testing.assert_array_equal(q_new[:2], q_old[:2])  # not among the last k=1 blocks
  assert np.abs(q_new[2] - q_old[2]).max() > 0
