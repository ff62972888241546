"""Penalties (docs/methods.md §5.1-5.7): each quadratic gradient == jax.grad of its closed form and
a float64 NumPy formula, on full params and on merged LoRA deltas; L2-SP's new leaves; LwF = KL +
teacher entropy; KL value and gradient 0 at the reference; clear errors."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mllm_tune as mt
from mllm_tune.train import step as step_lib
from mllm_tune import penalties
from mllm_tune.losses import distill as losses_distill
from mllm_tune import pytree as select
from tests.helpers.tiny_models import tiny_lm

COEF = {"ewc": 0.5, "online_ewc": 0.5, "mas": 1.0, "l2sp": 0.5}  # value = COEF * w * sum(..)


def _importance(variables, paths, seed=0):
  rng = np.random.RandomState(seed)
  flat = select.flatten(variables)
  return {p: jnp.asarray(rng.rand(*flat[p].shape).astype(np.float32)) for p in paths}


def _perturb(tree, seed=1, scale=0.3):
  rng = np.random.RandomState(seed)
  return jax.tree.map(lambda x: x + jnp.asarray(rng.randn(*x.shape).astype(np.float32) * scale),
                      tree)


def _penalty_grad(bound, consts, trainable, frozen):
  tx = bound.transform()
  zeros = jax.tree.map(jnp.zeros_like, trainable)
  g, _ = tx.update(zeros, tx.init(trainable), trainable, frozen=frozen, penalty_consts=consts)
  return select.flatten(g)


@pytest.mark.parametrize("name", ["ewc", "online_ewc", "mas", "l2sp"])
def test_quadratic_gradient_is_closed_form_on_full_params(name):
  _, params, _ = tiny_lm()
  method = mt.tuning.get("freeze", targets=r"llm/layers_1/mlp/.*|llm/final_norm/scale")
  variables = method.init_variables(jax.random.key(0), params)
  changed, merged, _ = penalties.penalisable(method, variables)
  assert merged and changed == ["params/llm/final_norm/scale", "params/llm/layers/mlp/down_proj/"
                                "kernel", "params/llm/layers/mlp/gate_proj/kernel",
                                "params/llm/layers/mlp/up_proj/kernel"]
  imp = _importance(variables, changed) if name != "l2sp" else None
  bound, consts = penalties.bind(penalties.get(name, weight=3.0), method, variables,
                                 importance=imp)
  assert set(bound.anchored) == set(changed)  # trained leaves keep a theta0 copy
  trainable, frozen = mt.tuning.partition(variables, method.trainable(variables))
  moved = _perturb(trainable)
  got = _penalty_grad(bound, consts, moved, frozen)
  flat0, flat = select.flatten(params), select.flatten(moved)

  def closed_form(t):
    ft = select.flatten(t)
    return sum(penalties.terms.quadratic(ft[p], flat0[p[7:]], None if imp is None else imp[p],
                                   COEF[name] * 3.0) for p in changed)
  want_jax = select.flatten(jax.grad(closed_form)(moved))
  total = 0.0
  for p in changed:
    d = np.asarray(flat[p], np.float64) - np.asarray(flat0[p[7:]], np.float64)
    f = 1.0 if imp is None else np.asarray(imp[p], np.float64)
    np.testing.assert_allclose(got[p], 2 * COEF[name] * 3.0 * f * d, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[p], want_jax[p], rtol=1e-5, atol=1e-6)
    total += COEF[name] * 3.0 * np.sum(f * d * d)
  np.testing.assert_allclose(float(bound.value(moved, frozen, consts)), total, rtol=1e-5)


def test_ewc_on_lora_weighs_the_merged_delta_by_the_base_kernel_fisher():
  _, params, _ = tiny_lm()
  method = mt.tuning.get("lora", rank=2, alpha=4.0, targets=r"llm/layers_0/attn/(q|v)_proj")
  variables = method.init_variables(jax.random.key(0), params)
  kernels = ["params/llm/layers/attn/q_proj/kernel", "params/llm/layers/attn/v_proj/kernel"]
  assert penalties.penalisable(method, variables) == (kernels, True, [])
  imp = _importance(variables, kernels)
  bound, consts = penalties.bind(penalties.get("ewc", weight=5.0), method, variables,
                                 importance=imp)
  assert bound.anchored == () and consts["anchor"] == {}  # the frozen base is the anchor
  trainable, frozen = mt.tuning.partition(variables, method.trainable(variables))
  flat_t = select.flatten(trainable)
  for k in flat_t:  # nonzero A and B on the targeted layer 0 only
    flat_t[k] = flat_t[k].at[0].set(jnp.asarray(np.random.RandomState(len(k)).randn(
        *flat_t[k].shape[1:]).astype(np.float32)))
  moved = select.unflatten(flat_t)
  got = _penalty_grad(bound, consts, moved, frozen)
  total = 0.0
  for kern in kernels:
    mod = kern[len("params/"):].rsplit("/", 1)[0]
    a = np.asarray(flat_t[f"adapters/{mod}/lora_a"], np.float64)
    b = np.asarray(flat_t[f"adapters/{mod}/lora_b"], np.float64)
    s = np.asarray(flat_t.get(f"adapters/{mod}/lora_scale", select.flatten(
        variables)[f"adapters/{mod}/lora_scale"]), np.float64)[:, None, None]
    assert s[0, 0, 0] == 2.0 and s[1, 0, 0] == 0.0  # alpha / r on layer 0, untargeted layer 1
    f = np.asarray(imp[kern], np.float64)
    delta = s * a @ b                                   # merged K0 + s A B minus K0
    r = 5.0 * f * delta                                 # lambda F (w - theta*)
    np.testing.assert_allclose(got[f"adapters/{mod}/lora_a"], s * r @ b.transpose(0, 2, 1),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[f"adapters/{mod}/lora_b"], s * a.transpose(0, 2, 1) @ r,
                               rtol=1e-5, atol=1e-5)
    total += 2.5 * np.sum(f * delta ** 2)
  np.testing.assert_allclose(float(bound.value(moved, frozen, consts)), total, rtol=1e-5)


def test_pissa_anchor_is_the_original_kernel_not_its_residual():
  _, params, _ = tiny_lm()
  method = mt.tuning.get("pissa", rank=2, alpha=2.0, targets=r"llm/layers_\d+/attn/q_proj")
  variables = method.init_variables(jax.random.key(0), params)
  bound, consts = penalties.bind(penalties.get("l2sp", weight=1.0), method, variables,
                                 base_params=params)
  assert bound.anchored == ("params/llm/layers/attn/q_proj/kernel",)
  trainable, frozen = mt.tuning.partition(variables, method.trainable(variables))
  assert float(bound.value(trainable, frozen, consts)) < 1e-9  # merged at init == K0


def test_l2sp_without_a_merge_pulls_trained_params_to_w0_and_new_leaves_to_zero():
  _, params, _ = tiny_lm()
  method = mt.tuning.get("adapter", bottleneck=4, train_norms=r"llm/final_norm/scale")
  variables = method.init_variables(jax.random.key(0), params)
  changed, merged, free = penalties.penalisable(method, variables)
  assert not merged and changed == ["params/llm/final_norm/scale"] and len(free) == 8
  bound, consts = penalties.bind(penalties.get("l2sp", weight=0.1, beta=0.01), method,
                                 variables)
  trainable, frozen = mt.tuning.partition(variables, method.trainable(variables))
  moved = _perturb(trainable)
  got, flat = _penalty_grad(bound, consts, moved, frozen), select.flatten(moved)
  w0 = np.asarray(params["llm"]["final_norm"]["scale"], np.float64)
  np.testing.assert_allclose(got["params/llm/final_norm/scale"],
                             0.1 * (np.asarray(flat["params/llm/final_norm/scale"]) - w0),
                             rtol=1e-5, atol=1e-7)
  for p in free:
    np.testing.assert_allclose(got[p], 0.01 * np.asarray(flat[p], np.float64), rtol=1e-5,
                               atol=1e-8)


def _softmax64(z):
  z = np.asarray(z, np.float64)
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def test_lwf_is_kl_plus_teacher_entropy_and_kl_matches_numpy():
  rng = np.random.RandomState(0)
  zs, zt = rng.randn(2, 3, 7) * 2, rng.randn(2, 3, 7) * 2
  w = (rng.rand(2, 3) > 0.3).astype(np.float32)
  for t in (1.0, 2.0):
    p0, q = _softmax64(zt / t), _softmax64(zs / t)
    kl_fwd = np.sum(w * np.sum(p0 * (np.log(p0) - np.log(q)), -1))
    kl_rev = np.sum(w * np.sum(q * (np.log(q) - np.log(p0)), -1))
    ent = np.sum(w * -np.sum(p0 * np.log(p0), -1))
    lwf = losses_distill.lwf_sum(jnp.asarray(zs), jnp.asarray(zt), jnp.asarray(w), t)
    np.testing.assert_allclose(float(lwf), kl_fwd + ent, rtol=1e-5)
    got = losses_distill.kl_sum(jnp.asarray(zs), jnp.asarray(zt), jnp.asarray(w), t, "forward",
                           t2_scale=True)
    np.testing.assert_allclose(float(got), t * t * kl_fwd, rtol=1e-5)
    got = losses_distill.kl_sum(jnp.asarray(zs), jnp.asarray(zt), jnp.asarray(w), t, "reverse",
                           t2_scale=False)
    np.testing.assert_allclose(float(got), kl_rev, rtol=1e-5)


@pytest.mark.parametrize("method_name", ["lora", "full"])
def test_kl_value_and_gradient_are_zero_at_the_reference(method_name):
  model, params, batch = tiny_lm()
  batch = {**batch, "loss_mask": np.ones_like(batch["input_ids"])}
  method = (mt.tuning.get("lora", rank=2) if method_name == "lora"
            else mt.tuning.get("freeze", preset="full"))
  variables = method.init_variables(jax.random.key(0), params)
  bound, consts = penalties.bind(penalties.get("kl", weight=1.0, tokens="all"), method,
                                 variables)
  assert (consts["anchor"] == {}) == (method_name == "lora")  # full FT keeps a theta0 copy
  trainable, frozen = mt.tuning.partition(variables, method.trainable(variables))
  fns = step_lib.StepFns(model, method, None, penalty=bound)
  term = lambda t: step_lib.micro_loss(fns, t, frozen, batch, jax.random.key(0), 18.0, 1,
                                       penalty_consts=consts)[1]["loss_terms/kl"]
  value_and_grad = jax.jit(jax.value_and_grad(term))
  value, grad = value_and_grad(trainable)
  moved_value, moved_grad = value_and_grad(_perturb(trainable, scale=0.05))
  largest = lambda g: max(float(jnp.abs(x).max()) for x in jax.tree.leaves(g))
  assert float(moved_value) > 1e-4 and abs(float(value)) < 1e-6 * float(moved_value)
  assert largest(grad) < 1e-6 * largest(moved_grad)  # 0 up to float32 rounding under jit


def test_bad_penalties_raise_clear_errors():
  _, params, _ = tiny_lm()
  method = mt.tuning.get("lora", rank=2, targets=r"llm/layers_\d+/attn/(q|v)_proj")
  variables = method.init_variables(jax.random.key(0), params)
  k = "params/llm/layers/attn/k_proj/kernel"
  with pytest.raises(penalties.PenaltyError, match=rf"my.fisher: leaf '{k}' is neither trained "
                                                   r"by method 'lora' nor changed by its merge"):
    penalties.bind(penalties.get("ewc", weight=1.0), method, variables,
                   importance=_importance(variables, [k]), where="my.fisher")
  q = "params/llm/layers/attn/q_proj/kernel"
  with pytest.raises(penalties.PenaltyError, match=rf"leaf '{q}' has shape \(3,\)"):
    penalties.bind(penalties.get("ewc", weight=1.0), method, variables,
                   importance={q: jnp.ones(3)})
  with pytest.raises(penalties.PenaltyError, match="needs an importance"):
    penalties.bind(penalties.get("mas", weight=1.0), method, variables)
  with pytest.raises(penalties.PenaltyError, match="needs penalty.weight"):
    penalties.get("ewc")
  with pytest.raises(penalties.PenaltyError, match=r"unknown penalty 'ewk'"):
    penalties.from_config({"name": "ewk"})
  with pytest.raises(penalties.PenaltyError, match=r"'ewc' has no option\(s\) \['beta'\]"):
    penalties.get("ewc", weight=1.0, beta=0.1)
  with pytest.raises(penalties.PenaltyError, match=r"gamma must be in \(0, 1\]"):
    penalties.get("online_ewc", weight=1.0, gamma=1.5)
  bound, consts = penalties.bind(penalties.get("l2sp"), method, variables)
  trainable, _ = mt.tuning.partition(variables, method.trainable(variables))
  tx = bound.transform()
  with pytest.raises(penalties.PenaltyError, match="frozen=frozen_partition"):
    tx.update(trainable, tx.init(trainable), trainable)
