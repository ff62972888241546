"""The post-hoc step of a recipe (train/posthoc_step.py): WiSE-FT / DARE / TIES candidates on
tuned methods, sweep selection, records and errors.

References are float64 NumPy written here: theta_ft of LoRA is `W + s A @ B`, WiSE-FT is
`(1 - a) theta0 + a theta_ft`, DARE `theta0 + lam m tau / (1 - p)`, single-task TIES
`theta0 + lam * (tau where |tau| >= its n_keep-th largest |tau|)`."""
from __future__ import annotations

import json
import types

import jax
import ml_collections
import numpy as np
import pytest

from mllm_tune.train import posthoc_step as ph
from mllm_tune.tuning import api, from_config
from mllm_tune.posthoc import merging
from mllm_tune import pytree as select

SHAPES = {"llm/layers/attn/q_proj/kernel": (2, 4, 6), "llm/layers/attn/v_proj/kernel": (2, 4, 6),
          "llm/layers/input_norm/scale": (2, 4), "llm/embed/embedding": (10, 4),
          "projector/linear_1/kernel": (3, 4), "projector/linear_1/bias": (4,)}
LORA = {"name": "lora", "rank": 2, "alpha": 4.0, "targets": r"llm/layers_\d+/attn/(q|v)_proj"}
GRID = tuple(i / 10 for i in range(11))


def _tree(seed: int, scale: float = 1.0) -> dict:
  rng = np.random.RandomState(seed)
  return select.unflatten({p: jax.numpy.asarray(scale * rng.randn(*s), jax.numpy.float32)
                           for p, s in SHAPES.items()})


def _f64(tree) -> dict:
  return {p: np.asarray(x, np.float64) for p, x in select.flatten(tree).items()}


def _lora():
  """(method, variables, theta0, theta_ft in float64 NumPy) with random non-zero B."""
  method, theta0 = from_config(LORA), _tree(0)
  v = method.init_variables(jax.random.key(1), theta0)
  ad = select.flatten(v["adapters"])
  rng = np.random.RandomState(2)
  for p in ad:
    if p.endswith("lora_b"):
      ad[p] = jax.numpy.asarray(rng.randn(*ad[p].shape), jax.numpy.float32)
  v = {"params": theta0, "adapters": select.unflatten(ad)}
  want = _f64(theta0)
  for m in ("q_proj", "v_proj"):
    pre = f"llm/layers/attn/{m}/"
    s = np.asarray(ad[pre + "lora_scale"], np.float64)[:, None, None]
    a, b = np.asarray(ad[pre + "lora_a"], np.float64), np.asarray(ad[pre + "lora_b"], np.float64)
    want[pre + "kernel"] = want[pre + "kernel"] + s * (a @ b)
  return method, v, theta0, want


def _full():
  """Full FT: variables["params"] are the trained weights, theta0 the pretrained ones."""
  method, theta0, trained = from_config({"name": "freeze", "preset": "full"}), _tree(0), _tree(3)
  return method, {"params": trained, "adapters": {}}, theta0, _f64(trained)


def _close(got: dict, want: dict, tol: float = 1e-5) -> None:
  got = _f64(got)
  assert sorted(got) == sorted(want)
  for p in want:
    np.testing.assert_allclose(got[p], want[p], rtol=tol, atol=tol, err_msg=p)


# ----------------------------------------------------------------------------- WiSE-FT
@pytest.mark.parametrize("build", [_lora, _full], ids=["lora", "full_ft"])
def test_wise_ft_candidates_match_numpy_and_endpoints_are_exact(build):
  method, v, theta0, ft = build()
  cfg = ml_collections.ConfigDict(dict(name="wise_ft", sweep=(0.0, 0.3, 1.0, 1.5)))
  gen = ph.candidates(cfg, method, v, theta0)
  assert isinstance(gen, types.GeneratorType)  # lazy: one merged tree at a time
  out = list(gen)
  assert [a for a, _ in out] == [0.0, 0.3, 1.0, 1.5]
  r0 = _f64(theta0)
  for a, params in out:
    assert "adapters" not in params
    _close(params, {p: (1 - a) * r0[p] + a * ft[p] for p in r0})  # 1.5: extrapolation
  theta_ft = method.merge(v)
  for (a, params), want in ((out[0], theta0), (out[2], theta_ft)):
    for p, x in select.flatten(want).items():
      y = select.flatten(params)[p]
      assert y.dtype == x.dtype and np.array_equal(np.asarray(y), np.asarray(x)), (a, p)


def test_wise_ft_default_alpha_and_per_module_rules_pass_through():
  method, v, theta0, ft = _lora()
  rules = ((r"llm/layers_1/attn/q_proj/.*", 1.0),)
  (a, params), = ph.candidates({"name": "wise_ft", "alphas": rules}, method, v, theta0)
  assert a == 0.5
  r0, got = _f64(theta0), _f64(params)
  q = "llm/layers/attn/q_proj/kernel"
  np.testing.assert_allclose(got[q][1], ft[q][1], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(got[q][0], 0.5 * (r0[q][0] + ft[q][0]), rtol=1e-6, atol=1e-6)
  with pytest.raises(ph.PosthocError, match="wise_ft.*nothing_here"):
    ph.check({"name": "wise_ft", "alphas": (("nothing_here/.*", 0.2),)}, method, v)


# ----------------------------------------------------------------------------- selection
def test_run_picks_the_hand_computed_best_alpha_and_records_before_after():
  method, v, theta0, ft = _lora()
  r0 = _f64(theta0)
  target = {p: 0.7 * r0[p] + 0.3 * ft[p] for p in r0}
  calls = []

  def score_fn(params):
    f = _f64(params)
    d = sum(float(np.sum((f[p] - target[p]) ** 2)) for p in f)
    calls.append(1)
    return {"tradeoff/O": np.float32(-d), "eval/dist": jax.numpy.asarray(d), "eval/n": 3}

  # by hand: the score of each grid point, on NumPy-interpolated trees
  hand = [-sum(float(np.sum(((1 - a) * r0[p] + a * ft[p] - target[p]) ** 2)) for p in r0)
          for a in GRID]
  want = GRID[int(np.argmax(hand))]
  assert want == 0.3
  cfg = {"name": "wise_ft", "sweep": GRID}
  params, rec = ph.run(cfg, method, v, theta0, score_fn)
  assert len(calls) == len(GRID) + 1
  assert rec["name"] == "wise_ft" and rec["param"] == "alpha" and rec["chosen"] == want
  assert rec["select"] == {"metric": "tradeoff/O", "mode": "max"}
  assert [c["value"] for c in rec["candidates"]] == list(GRID)
  np.testing.assert_allclose([c["metrics"]["tradeoff/O"] for c in rec["candidates"]], hand,
                             rtol=1e-4, atol=1e-6)
  d_ft = sum(float(np.sum((ft[p] - target[p]) ** 2)) for p in r0)
  np.testing.assert_allclose(rec["before"]["eval/dist"], d_ft, rtol=1e-4)
  assert rec["after"] == rec["candidates"][3]["metrics"] and rec["after"]["eval/n"] == 3
  _close(params, target)
  again = json.loads(json.dumps(rec))
  assert again["chosen"] == 0.3 and type(rec["before"]["tradeoff/O"]) is float
  # mode=min on another metric; the last candidate chosen is returned as scored
  params, rec = ph.run(cfg, method, v, theta0, score_fn, metric="eval/dist", mode="min")
  assert rec["chosen"] == 0.3 and rec["select"]["mode"] == "min"
  params, rec = ph.run({"name": "wise_ft", "sweep": (0.0, 0.3)}, method, v, theta0, score_fn)
  assert rec["chosen"] == 0.3
  _close(params, target)


def test_run_ties_go_to_the_first_candidate_and_nan_never_wins():
  method, v, theta0, _ = _full()
  params, rec = ph.run({"name": "wise_ft", "sweep": (0.2, 0.9, 0.5)}, method, v, theta0,
                       lambda p: {"tradeoff/O": 1.0})
  assert rec["chosen"] == 0.2
  _close(params, {p: 0.8 * x + 0.2 * _f64(v["params"])[p] for p, x in _f64(theta0).items()})
  scores = iter([0.0, float("nan"), 5.0, float("nan")])  # before, then 3 candidates
  _, rec = ph.run({"name": "wise_ft", "sweep": (0.2, 0.9, 0.5)}, method, v, theta0,
                  lambda p: {"tradeoff/O": next(scores)})
  assert rec["chosen"] == 0.9
  with pytest.raises(ph.PosthocError, match="no candidate.*finite"):
    ph.run({"name": "wise_ft", "sweep": (0.2,)}, method, v, theta0,
           lambda p: {"tradeoff/O": float("nan")})


# ----------------------------------------------------------------------------- DARE / TIES
def test_dare_matches_numpy_with_merging_mask_and_p0_is_theta_ft():
  method, v, theta0, ft = _lora()
  r0 = _f64(theta0)
  tau = {p: ft[p] - r0[p] for p in r0}
  cfg = {"name": "dare", "sweep": (0.0, 0.5), "lam": 0.8, "seed": 4}
  out = dict(ph.candidates(cfg, method, v, theta0))
  _close(out[0.0], {p: r0[p] + 0.8 * tau[p] for p in r0})
  _close(ph.candidates({"name": "dare", "sweep": (0.0,)}, method, v, theta0).__next__()[1], ft)
  key = jax.random.fold_in(jax.random.key(4), 0)  # task 0 of dare_merge
  mask = _f64(merging.dare_mask(select.unflatten(tau), 0.5, key))
  want = {p: r0[p] + 0.8 * mask[p] * tau[p] / 0.5 for p in r0}
  _close(out[0.5], want)
  assert any(0 < mask[p].mean() < 1 for p in mask if "q_proj" in p)
  tau_j = merging.task_vectors(theta0, [method.merge(v)])
  _close(out[0.5], _f64(merging.dare_merge(theta0, tau_j, 0.5, jax.random.key(4), lam=0.8)))
  (_, plain), = ph.candidates({**cfg, "sweep": (0.5,), "rescale": False}, method, v, theta0)
  _close(plain, {p: r0[p] + 0.8 * mask[p] * tau[p] for p in r0})
  (_, default), = ph.candidates({"name": "dare"}, method, v, theta0)  # p = 0.9, lam = 1, seed 0
  mask9 = _f64(merging.dare_mask(select.unflatten(tau), 0.9, jax.random.fold_in(
      jax.random.key(0), 0)))
  _close(default, {p: r0[p] + mask9[p] * tau[p] / 0.1 for p in r0}, tol=1e-4)


def _ties64(r0: dict, tau: dict, k: float, lam: float) -> dict:
  """Single-task TIES, global scope: keep |tau| >= the max(1, int(k n))-th largest |tau|."""
  flat = np.concatenate([np.abs(t).ravel() for t in tau.values()])
  thr = np.sort(flat)[::-1][max(1, int(k * flat.size)) - 1]
  return {p: r0[p] + lam * np.where(np.abs(tau[p]) >= thr, tau[p], 0.0) for p in r0}


def test_ties_single_task_matches_numpy_and_k1_is_theta_ft():
  method, v, theta0, ft = _full()
  r0 = _f64(theta0)
  tau = {p: ft[p] - r0[p] for p in r0}
  out = dict(ph.candidates({"name": "ties", "sweep": (0.1, 0.5, 1.0), "lam": 1.2}, method, v,
                           theta0))
  for k in (0.1, 0.5, 1.0):
    _close(out[k], _ties64(r0, tau, k, 1.2))
  (k, params), = ph.candidates({"name": "ties", "sweep": (1.0,)}, method, v, theta0)
  _close(params, ft)
  (k, params), = ph.candidates({"name": "ties"}, method, v, theta0)
  assert k == 0.2
  _close(params, _ties64(r0, tau, 0.2, 1.0))
  kept = sum(int(np.sum(_f64(params)[p] != r0[p])) for p in r0)
  assert kept == int(0.2 * sum(x.size for x in r0.values()))


def test_full_ft_record_of_a_ties_run_names_k():
  method, v, theta0, _ = _full()
  _, rec = ph.run(ml_collections.ConfigDict({"name": "ties", "sweep": (0.2, 1.0)}), method, v,
                  theta0, lambda p: {"tradeoff/H": float(_f64(p)["projector/linear_1/bias"][0])},
                  metric="tradeoff/H")
  assert rec["param"] == "k" and rec["chosen"] in (0.2, 1.0)
  assert rec["config"]["scope"] == "global" and json.dumps(rec)


# ----------------------------------------------------------------------------- errors
def test_unknown_names_keys_and_bad_values_are_clear_errors():
  method, v, theta0, _ = _lora()
  with pytest.raises(ph.PosthocError, match="unknown post-hoc step 'swa'; known: none, wise_ft"):
    ph.check({"name": "swa"}, method)
  with pytest.raises(ph.PosthocError, match=r"unknown key\(s\) \['alpah'\]"):
    ph.check({"name": "wise_ft", "alpah": 0.3}, method)
  bad = [({"name": "dare", "p": 1.0}, r"p must be in \[0, 1\), got 1.0"),
         ({"name": "dare", "sweep": (0.5, -0.1)}, r"p must be in \[0, 1\)"),
         ({"name": "ties", "k": 0.0}, r"k must be in \(0, 1\]"),
         ({"name": "ties", "sweep": (1.5,)}, r"k must be in \(0, 1\]"),
         ({"name": "ties", "scope": "layer"}, "scope must be 'global' or 'tensor'"),
         ({"name": "wise_ft", "sweep": (0.5, float("inf"))}, "alpha must be finite"),
         ({"name": "wise_ft", "alpha": "half"}, "alpha must be a number"),
         ({"name": "dare", "lam": float("nan")}, "lam must be finite"),
         ({"name": "wise_ft", "alphas": (("llm/.*", float("nan")),)}, "alphas rules")]
  for cfg, msg in bad:
    with pytest.raises(ph.PosthocError, match=msg):
      ph.check(cfg, method)
    with pytest.raises(ph.PosthocError, match=msg):
      ph.candidates(cfg, method, v, theta0)  # eager, before any merge
  ph.check({"name": "wise_ft", "sweep": (-0.5, 2.0)}, method, v)  # extrapolation is allowed
  ph.check({"name": "none"}, from_config({"name": "prompt_tuning", "num_virtual_tokens": 2}))
  with pytest.raises(ph.PosthocError, match="'none'"):
    ph.run({"name": "none"}, method, v, theta0, lambda p: {})
  with pytest.raises(ph.PosthocError, match="mode must be 'max' or 'min'"):
    ph.run({"name": "wise_ft"}, method, v, theta0, lambda p: {"tradeoff/O": 0.0}, mode="up")


def test_non_mergeable_methods_are_refused_with_and_without_variables():
  theta0 = _tree(0)
  prompt = from_config({"name": "prompt_tuning", "num_virtual_tokens": 2})
  pv = prompt.init_variables(jax.random.key(0), theta0)
  msg = (r"post-hoc step 'wise_ft' works on base weights; method 'prompt_tuning' adds modules "
         r"that do not merge into them \(its class sets mergeable = False\)")
  with pytest.raises(ph.PosthocError, match=msg):
    ph.check({"name": "wise_ft"}, prompt)
  with pytest.raises(ph.PosthocError, match=msg):
    ph.candidates({"name": "wise_ft"}, prompt, pv, theta0)
  both = api.compose(from_config(LORA), prompt)
  with pytest.raises(ph.PosthocError, match="method 'prompt_tuning'.*composed in 'Compose'"):
    ph.check({"name": "ties"}, both)

  class Refuses(api.Method):  # mergeable flag True, but its merge refuses these variables
    def merge(self, variables):
      raise api.MethodError("extra biases the model lacks")

  with pytest.raises(ph.PosthocError, match=r"'dare'.*\(MethodError: extra biases the model"):
    ph.check({"name": "dare"}, Refuses(), {"params": theta0, "adapters": {}})
  ph.check({"name": "dare"}, Refuses())  # without variables: only the flags are known
  abstract = jax.eval_shape(lambda: from_config(LORA).init_variables(jax.random.key(0), theta0))
  ph.check({"name": "wise_ft"}, from_config(LORA), abstract)


def test_missing_metric_and_mismatched_trees_are_clear_errors():
  method, v, theta0, _ = _lora()
  with pytest.raises(ph.PosthocError, match="'tradeoff/O' is not in.*eval/target/vqa"):
    ph.run({"name": "wise_ft"}, method, v, theta0, lambda p: {"eval/target/vqa": 50.0})
  with pytest.raises(ph.PosthocError, match="non-scalar metric 'tradeoff/O'"):
    ph.run({"name": "wise_ft"}, method, v, theta0, lambda p: {"tradeoff/O": np.zeros(3)})
  small = select.flatten(theta0)
  del small["projector/linear_1/bias"]
  calls = []
  with pytest.raises(ph.PosthocError, match=r"'ties'.*differ at \['projector/linear_1/bias'\]"):
    ph.run({"name": "ties"}, method, v, select.unflatten(small), calls.append)
  assert not calls  # refused before the (expensive) evaluation of theta_ft
  small = select.flatten(theta0)
  small["projector/linear_1/bias"] = small["projector/linear_1/bias"][:2]
  with pytest.raises(ph.PosthocError, match="differ at.*projector/linear_1/bias"):
    ph.candidates({"name": "wise_ft"}, method, v, select.unflatten(small))
