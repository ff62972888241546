"""Several penalties in one run (`penalty.name="ewc+lwf"`, penalties/combined.py): the coupled
gradient of ewc + l2sp is the float64 sum of their closed forms (l2sp not weighed by the shared
Fisher); one SGD step with ewc + lwf moves the weights by the sum of what each penalty adds to the
plain step, logs each term as the single penalty does, and shares one theta0 copy; clear errors
for combinations that cannot be run."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mllm_tune as mt
from mllm_tune import penalties
from mllm_tune import pytree as select
from mllm_tune.configs import base
from mllm_tune.train import config_io, step as step_lib
from tests.helpers.tiny_models import tiny_lm


def _config(**kw):
  c = base.get_config().penalty
  for k, v in kw.items():
    if k == "weights":
      c.weights.update(v)
    else:
      setattr(c, k, v)
  return c


def _importance(variables, paths):
  rng = np.random.RandomState(0)
  flat = select.flatten(variables)
  return {p: jnp.asarray(rng.rand(*flat[p].shape).astype(np.float32)) for p in paths}


def test_ewc_plus_l2sp_gradient_is_the_sum_of_both_closed_forms():
  _, params, _ = tiny_lm()
  method = mt.tuning.get("freeze", targets=r"llm/layers_1/mlp/.*|llm/final_norm/scale")
  variables = method.init_variables(jax.random.key(0), params)
  changed, _, _ = penalties.penalisable(method, variables)
  imp = _importance(variables, changed)
  combo = penalties.from_config(_config(name="ewc+l2sp", weights={"ewc": 3.0, "l2sp": 0.7}))
  assert combo.name == "ewc+l2sp" and penalties.importance_source(combo).name == "ewc"
  bound, consts = penalties.bind(combo, method, variables, importance=imp)
  assert isinstance(bound, penalties.BoundCombination)
  assert sorted(consts["anchor"]) == changed
  # members bound together share one theta0 copy per leaf (`anchor_copies`)
  shared: dict = {}
  _, c1 = penalties.api.bind(penalties.get("ewc", weight=1.0), method, variables,
                             importance=imp, anchor_copies=shared)
  _, c2 = penalties.api.bind(penalties.get("l2sp"), method, variables, anchor_copies=shared)
  assert c1["anchor"] and all(c2["anchor"][p] is x for p, x in c1["anchor"].items())
  trainable, frozen = mt.tuning.partition(variables, method.trainable(variables))
  rng = np.random.RandomState(1)
  moved = jax.tree.map(lambda x: x + jnp.asarray(rng.randn(*x.shape).astype(np.float32) * 0.3),
                       trainable)
  tx = bound.transform()
  g, _ = tx.update(jax.tree.map(jnp.zeros_like, moved), tx.init(moved), moved, frozen=frozen,
                   penalty_consts=consts)
  got, flat, flat0 = select.flatten(g), select.flatten(moved), select.flatten(params)
  total = 0.0
  for p in changed:
    d = np.asarray(flat[p], np.float64) - np.asarray(flat0[p[7:]], np.float64)
    f = np.asarray(imp[p], np.float64)
    # ewc: (3/2) F d^2 -> 3 F d;  l2sp: (0.7/2) d^2 -> 0.7 d (no Fisher)
    np.testing.assert_allclose(got[p], 3.0 * f * d + 0.7 * d, rtol=1e-5, atol=1e-6)
    total += 1.5 * np.sum(f * d * d) + 0.35 * np.sum(d * d)
  np.testing.assert_allclose(float(bound.value(moved, frozen, consts)), total, rtol=1e-5)


def _sgd_step(model, method, variables, batch, penalty, imp):
  """One jitted SGD step (lr 0.1) of full fine-tuning from theta0 + a fixed perturbation:
  (update, metrics)."""
  mask = method.trainable(variables)
  trainable, frozen = mt.tuning.partition(variables, mask)
  rng = np.random.RandomState(2)
  trainable = jax.tree.map(
      lambda x: x + jnp.asarray(rng.randn(*x.shape).astype(np.float32) * 0.05), trainable)
  opt = optax.sgd(0.1)
  bound = consts = None
  if penalty is not None:
    bound, consts = penalties.bind(penalty, method, variables, importance=imp)
    opt = optax.chain(bound.transform(), opt)
  fns = step_lib.StepFns(model, method, opt, penalty=bound)
  state = step_lib.TrainState(step=jnp.zeros((), jnp.int32), trainable=trainable,
                              opt_state=opt.init(trainable), rng=jax.random.key(0))
  new, metrics = jax.jit(lambda s: step_lib.train_step(fns, frozen, s, batch,
                                                       penalty_consts=consts))(state)
  update = jax.tree.map(lambda a, b: np.asarray(a, np.float64) - np.asarray(b, np.float64),
                        new.trainable, trainable)
  return select.flatten(update), {k: float(v) for k, v in metrics.items()}, consts


def test_ewc_plus_lwf_step_adds_what_each_penalty_adds_and_logs_both_terms():
  model, params, batch = tiny_lm()
  batch = {**batch, "loss_mask": np.ones_like(batch["input_ids"])}
  method = mt.tuning.get("freeze", preset="full")
  variables = method.init_variables(jax.random.key(0), params)
  changed, _, _ = penalties.penalisable(method, variables)
  imp = _importance(variables, changed)
  plain, _, _ = _sgd_step(model, method, variables, batch, None, None)
  ewc, m_ewc, _ = _sgd_step(model, method, variables, batch, penalties.get("ewc", weight=50.0),
                            imp)
  lwf, m_lwf, _ = _sgd_step(model, method, variables, batch, penalties.get("lwf", weight=2.0),
                            None)
  combo = penalties.from_config(_config(name="ewc+lwf", weights={"ewc": 50.0, "lwf": 2.0}))
  both, m_both, consts = _sgd_step(model, method, variables, batch, combo, imp)
  for p in plain:
    added_ewc, added_lwf = ewc[p] - plain[p], lwf[p] - plain[p]
    assert np.abs(added_ewc).max() > 1e-4 and np.abs(added_lwf).max() > 1e-5, p
    np.testing.assert_allclose(both[p] - plain[p], added_ewc + added_lwf, rtol=1e-3,
                               atol=1e-6, err_msg=p)
  for name, single in (("ewc", m_ewc), ("lwf", m_lwf)):
    assert single[f"loss_terms/{name}"] > 0
    np.testing.assert_allclose(m_both[f"loss_terms/{name}"], single[f"loss_terms/{name}"],
                               rtol=1e-5)
  np.testing.assert_allclose(m_both["loss"], m_both["ce"] + m_ewc["loss_terms/ewc"]
                             + m_lwf["loss_terms/lwf"], rtol=1e-5)


@pytest.mark.parametrize("cfg, match", [
    (dict(name="ewc+mas", weights={"ewc": 1.0, "mas": 1.0}),
     r"at most one importance-weighted .* got ewc and mas"),
    (dict(name="lwf+kl", weights={"kl": 1.0}), r"at most one distillation .* got lwf and kl"),
    (dict(name="ewc+gift", weights={"ewc": 1.0}), r"penalty 'gift' cannot be combined"),
    (dict(name="l2sp+none"), r"penalty 'none' cannot be combined"),
    (dict(name="lwf+lwf"), r"'lwf\+lwf' names a penalty twice"),
    (dict(name="ewc+ewk", weights={"ewc": 1.0}), r"unknown penalty 'ewk' in 'ewc\+ewk'"),
    (dict(name="ewc+lwf", weight=1.0), r"penalty.weight is ambiguous for 'ewc\+lwf': set each "
                                       r"member's weight with penalty.weights.ewc, "
                                       r"penalty.weights.lwf"),
    (dict(name="mas+lwf"), r"penalty 'mas' in a combination needs penalty.weights.mas"),
    (dict(name="ewc", weight=1.0, weights={"ewc": 2.0}),
     r"penalty.weight 1.0 and penalty.weights.ewc 2.0 disagree"),
    (dict(name="ewc+lwf", weights={"ewc": 1.0, "kl": 5.0}),
     r"penalty.weights.kl is set but 'kl' is not in penalty.name 'ewc\+lwf'"),
    (dict(name="lwf", weights={"ewc": 1e3}), r"penalty.weights.ewc is set but 'ewc' is not in"),
])
def test_combinations_that_cannot_run_are_refused_by_name(cfg, match):
  with pytest.raises(penalties.PenaltyError, match=match):
    penalties.from_config(_config(**cfg))
  full = base.get_config()  # the trainer's config check refuses it before any weight loads
  full.penalty = _config(**cfg)
  with pytest.raises(config_io.ConfigError, match="config 'penalty': .*" + match):
    config_io.validate(full)


def test_member_weights_and_shared_options_reach_the_right_members():
  combo = penalties.from_config(_config(name="online_ewc+kl+l2sp", gamma=0.5, temperature=3.0,
                                        beta=0.02, weights={"online_ewc": 4.0, "kl": 0.1}))
  ewc, kl, l2sp = combo.members
  assert (ewc.name, ewc.weight, ewc.gamma) == ("online_ewc", 4.0, 0.5)
  assert (kl.name, kl.weight, kl.temperature) == ("kl", 0.1, 3.0)
  assert (l2sp.name, l2sp.weight, l2sp.beta) == ("l2sp", 0.1, 0.02)  # l2sp's default alpha
  single = penalties.from_config(_config(name="ewc", weights={"ewc": 7.0}))
  assert single.weight == 7.0 and penalties.importance_source(single) is single
  assert penalties.from_config(_config(name=" lwf ")).name == "lwf"
  assert penalties.from_config(_config(name="ewc + lwf", weights={"ewc": 1.0})).name == "ewc+lwf"
