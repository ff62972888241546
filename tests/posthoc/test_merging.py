"""Post-hoc weight-space methods (merging.py): WiSE-FT, task arithmetic, TIES, DARE, their configs.

References are float64 NumPy written here, independently of the implementation."""
from __future__ import annotations

import importlib
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mllm_tune as mt
from mllm_tune.demo import tiny_llava_config
from mllm_tune.posthoc import merging
from mllm_tune import pytree as select
from mllm_tune.pytree import SelectorError


@pytest.fixture(scope="module")
def llava():
  model = mt.build_model(tiny_llava_config())
  return model, mt.init_params(model, jax.random.key(0)), mt.init_params(model, jax.random.key(1))


SHAPES = {"llm/layers/attn/q_proj/kernel": (3, 4, 6), "llm/layers/norm/scale": (3, 5),
          "llm/embed/embedding": (7, 4), "projector/linear_1/bias": (9,)}


def _tree(rng, scale=1.0) -> dict:
  """A small float32 params-like tree with stacked (L = 3) and unstacked leaves."""
  return select.unflatten({p: jnp.asarray(scale * rng.randn(*s), jnp.float32)
                           for p, s in SHAPES.items()})


def _f64(tree) -> dict:
  return {p: np.asarray(x, np.float64) for p, x in select.flatten(tree).items()}


# ----------------------------------------------------------------------------- WiSE-FT
def test_wise_ft_endpoints_are_bit_exact_and_midpoints_match_numpy():
  rng = np.random.RandomState(0)
  t0, t1 = _tree(rng), _tree(rng)
  t0["projector"]["linear_1"]["bias"] = t0["projector"]["linear_1"]["bias"].astype(jnp.bfloat16)
  t1["projector"]["linear_1"]["bias"] = t1["projector"]["linear_1"]["bias"].astype(jnp.bfloat16)
  for a, want in ((0.0, t0), (1.0, t1)):
    got = merging.wise_ft(t0, t1, a)
    for p, x in select.flatten(want).items():
      y = select.flatten(got)[p]
      assert y.dtype == x.dtype and np.array_equal(np.asarray(y), np.asarray(x)), (a, p)
  got = select.flatten(merging.wise_ft(t0, t1, 0.3))
  r0, r1 = _f64(t0), _f64(t1)
  for p in r0:
    tol = 1e-2 if "bias" in p else 1e-6  # bf16 leaf
    np.testing.assert_allclose(np.asarray(got[p], np.float64), 0.7 * r0[p] + 0.3 * r1[p],
                               rtol=tol, atol=tol)


def test_wise_ft_endpoints_reproduce_each_models_logits(llava):
  model, p0, p1 = llava
  n_img = model.config.image_seq_len
  ids = np.array([[1, 7] + [255] * n_img + [9, 10]])
  px = np.random.RandomState(0).rand(1, 56, 56, 3).astype(np.float32)
  logits = jax.jit(lambda p: model.apply({"params": p}, ids, np.ones_like(ids), pixel_values=px))
  l0, l1 = np.asarray(logits(p0)), np.asarray(logits(p1))
  assert np.array_equal(np.asarray(logits(merging.wise_ft(p0, p1, 0.0))), l0)
  assert np.array_equal(np.asarray(logits(merging.wise_ft(p0, p1, 1.0))), l1)
  mid = np.asarray(logits(merging.wise_ft(p0, p1, 0.5)))
  assert np.abs(mid - l0).max() > 1e-3 and np.abs(mid - l1).max() > 1e-3


def test_per_module_alphas_on_stacked_layers_first_match_wins(llava):
  _, p0, p1 = llava
  rules = [(r"llm/layers_1/attn/.*", 1.0), (r"llm/layers_\d+/attn/.*", 0.0),
           (r"projector/.*", 0.25)]
  per_leaf = merging.alpha_per_leaf(p0, 0.5, rules)
  assert per_leaf["llm/layers/attn/q_proj/kernel"].shape == (2, 1, 1)
  assert per_leaf["llm/layers/mlp/up_proj/kernel"] == 0.5
  got, r0, r1 = select.flatten(merging.wise_ft(p0, p1, 0.5, rules)), _f64(p0), _f64(p1)
  for p, x in got.items():
    x = np.asarray(x, np.float64)
    if p.startswith("llm/layers/attn/"):
      np.testing.assert_array_equal(x[0], r0[p][0])   # layers_0: second rule, alpha 0
      np.testing.assert_array_equal(x[1], r1[p][1])   # layers_1: first rule wins, alpha 1
    else:
      a = 0.25 if p.startswith("projector/") else 0.5
      np.testing.assert_allclose(x, (1 - a) * r0[p] + a * r1[p], rtol=1e-6, atol=1e-7)


def test_wise_ft_bad_selectors_and_trees_are_clear_errors():
  rng = np.random.RandomState(0)
  t0, t1 = _tree(rng), _tree(rng)
  with pytest.raises(SelectorError, match=r"wise_ft alphas.*/atn/\.\*' matches no parameter path"):
    merging.wise_ft(t0, t1, 0.5, [(r"llm/layers_\d+/atn/.*", 1.0)])
  with pytest.raises(ValueError, match="alpha must be finite"):
    merging.wise_ft(t0, t1, float("nan"))
  bad = jax.tree.map(lambda x: x, t1)
  bad["llm"]["embed"]["embedding"] = jnp.zeros((7, 5))
  with pytest.raises(ValueError, match=r"shape mismatch at 'llm/embed/embedding'"):
    merging.wise_ft(t0, bad, 0.5)
  del bad["projector"]
  with pytest.raises(ValueError, match=r"missing paths \['projector/linear_1/bias'\]"):
    merging.wise_ft(t0, bad, 0.5)


def test_wise_ft_method_on_lora_scales_the_delta_and_needs_theta0_otherwise(llava):
  _, p0, _ = llava
  lora = mt.tuning.get("lora", rank=2, alpha=4.0, targets=r"llm/layers_\d+/attn/(q|v)_proj")
  v = lora.init_variables(jax.random.key(2), p0)
  ad = select.flatten(v["adapters"])
  for p in ad:
    if p.endswith("lora_b"):
      ad[p] = jax.random.normal(jax.random.key(3), ad[p].shape)
  v = {"params": p0, "adapters": select.unflatten(ad)}
  got = select.flatten(merging.wise_ft_method(lora, v, 0.3))
  scaled = dict(ad)
  for p in ad:
    if p.endswith("lora_scale"):
      scaled[p] = ad[p] * 0.3
  want = select.flatten(lora.merge({"params": p0, "adapters": select.unflatten(scaled)}))
  for p in want:
    np.testing.assert_allclose(got[p], want[p], rtol=1e-5, atol=1e-6)
  assert not np.allclose(got["llm/layers/attn/q_proj/kernel"],
                         select.flatten(p0)["llm/layers/attn/q_proj/kernel"])
  bitfit = mt.tuning.get("bitfit")
  with pytest.raises(ValueError, match="trains base weights.*pass theta0"):
    merging.wise_ft_method(bitfit, bitfit.init_variables(jax.random.key(0), p0), 0.5)
  pissa = mt.tuning.get("pissa", rank=2, targets=r"llm/layers_\d+/attn/q_proj")
  with pytest.raises(ValueError, match="rewrites the base weights"):
    merging.wise_ft_method(pissa, pissa.init_variables(jax.random.key(0), p0), 0.5)


# ----------------------------------------------------------------------------- task arithmetic
def test_task_vectors_and_task_arithmetic_match_numpy():
  rng = np.random.RandomState(1)
  t0, thetas = _tree(rng), [_tree(rng) for _ in range(3)]
  taus = merging.task_vectors(t0, thetas)
  got = select.flatten(merging.task_arithmetic(t0, taus, lam=0.4))
  r0, rs = _f64(t0), [_f64(t) for t in thetas]
  for p in r0:
    np.testing.assert_allclose(select.flatten(taus[1])[p], rs[1][p] - r0[p], rtol=1e-6, atol=1e-6)
    want = r0[p] + 0.4 * sum(r[p] - r0[p] for r in rs)
    np.testing.assert_allclose(np.asarray(got[p], np.float64), want, rtol=1e-5, atol=1e-6)
    assert got[p].dtype == jnp.float32 and got[p].shape == r0[p].shape


# ----------------------------------------------------------------------------- TIES
def _ties_reference(r0: dict, taus: list[dict], k: float, lam: float, scope: str) -> dict:
  """float64 TIES: per-task (global) or per-tensor-per-layer top-k trim, sign election,
  disjoint mean."""
  trimmed = []
  for tau in taus:
    out = {}
    if scope == "global":
      allv = np.sort(np.concatenate([np.abs(x).ravel() for x in tau.values()]))[::-1]
      thr = allv[max(1, int(k * allv.size)) - 1]
      out = {p: np.where(np.abs(x) >= thr, x, 0.0) for p, x in tau.items()}
    else:
      for p, x in tau.items():
        rows = x.reshape(x.shape[0], -1) if p.startswith("llm/layers/") else x.reshape(1, -1)
        kept = []
        for row in rows:
          thr = np.sort(np.abs(row))[::-1][max(1, int(k * row.size)) - 1]
          kept.append(np.where(np.abs(row) >= thr, row, 0.0))
        out[p] = np.stack(kept).reshape(x.shape)
    trimmed.append(out)
  merged = {}
  for p in r0:
    stack = np.stack([t[p] for t in trimmed])
    gamma = np.sign(stack.sum(0))
    agree = (np.sign(stack) == gamma) & (stack != 0)
    cnt = agree.sum(0)
    merged[p] = r0[p] + lam * np.where(cnt > 0, (stack * agree).sum(0) / np.maximum(cnt, 1), 0)
  return merged


@pytest.mark.parametrize("scope", ["global", "tensor"])
def test_ties_matches_numpy_reference(scope):
  rng = np.random.RandomState(2)
  t0, taus = _tree(rng), [_tree(rng, scale=0.1) for _ in range(3)]
  got = select.flatten(merging.ties_merge(t0, taus, k=0.2, lam=0.7, scope=scope))
  want = _ties_reference(_f64(t0), [_f64(t) for t in taus], 0.2, 0.7, scope)
  for p in want:
    np.testing.assert_allclose(np.asarray(got[p], np.float64), want[p], rtol=1e-6, atol=1e-6)
  trimmed = merging.ties_trim(taus, 0.2, scope)
  n = sum(np.size(x) for x in jax.tree.leaves(taus[0]))
  nonzero = sum(int(np.sum(np.asarray(x) != 0)) for x in jax.tree.leaves(trimmed[0]))
  if scope == "tensor":  # per layer for stacked leaves
    n = [int(0.2 * np.prod(s[1:] if p.startswith("llm/layers/") else s)) * (
        s[0] if p.startswith("llm/layers/") else 1) for p, s in SHAPES.items()]
    n = sum(max(1, ni) for ni in n)
  assert nonzero == (int(0.2 * n) if scope == "global" else n)


def test_ties_hand_made_three_task_case():
  # "w": k = 0.6 keeps 3 of 5 entries per task (per tensor):
  #   tau_hat1 = [4, 0, 2, -3, 0], tau_hat2 = [0, 3, -2, -4, 0], tau_hat3 = [2, -5, 2.5, 0, 0]
  #   sum = [6, -2, 2.5, -7, 0] -> gamma = [+, -, +, -, 0]
  #   tau_m = [mean(4, 2), -5, mean(2, 2.5), mean(-3, -4), 0] = [3, -5, 2.25, -3.5, 0]
  # "z": keeps 1 of 2: [1, 0], [-1, 0], [0, 0.1] -> entry 0 sums to 0: gamma = 0 -> 0.
  taus = [{"w": np.array([4, -1, 2, -3, 0.5]), "z": np.array([1, 0.5])},
          {"w": np.array([-1, 3, -2, -4, 1]), "z": np.array([-1, 0.05])},
          {"w": np.array([2, -5, 2.5, 0.5, 1.5]), "z": np.array([0, 0.1])}]
  taus = [{p: jnp.asarray(x, jnp.float32) for p, x in t.items()} for t in taus]
  tau_m = merging.ties_task_vector(taus, k=0.6, scope="tensor")
  np.testing.assert_array_equal(tau_m["w"], [3, -5, 2.25, -3.5, 0])
  np.testing.assert_allclose(tau_m["z"], [0, 0.1], rtol=1e-6)
  theta0 = {"w": jnp.ones(5), "z": jnp.zeros(2)}
  np.testing.assert_array_equal(merging.ties_merge(theta0, taus, 0.6, 0.5, "tensor")["w"],
                                [2.5, -1.5, 2.125, -0.75, 1])


# ----------------------------------------------------------------------------- DARE
def test_dare_fixed_key_matches_numpy_with_the_same_mask():
  rng = np.random.RandomState(3)
  tau = _tree(rng)
  key = jax.random.key(7)
  masks = select.flatten(merging.dare_mask(tau, 0.9, key))
  got = select.flatten(merging.dare(tau, 0.9, key))
  kept = np.concatenate([np.asarray(m).ravel() for m in masks.values()])
  assert abs(kept.mean() - 0.1) < 4 * np.sqrt(0.09 / kept.size)  # Bernoulli(1 - p) rate
  for p, x in _f64(tau).items():
    np.testing.assert_allclose(np.asarray(got[p], np.float64),
                               np.asarray(masks[p], np.float64) * x / (1 - 0.9), rtol=1e-6)
    assert got[p].dtype == jnp.float32
  same = select.flatten(merging.dare(tau, 0.9, key))
  assert all(np.array_equal(same[p], got[p]) for p in got)
  other = select.flatten(merging.dare(tau, 0.9, jax.random.key(8)))
  assert not all(np.array_equal(other[p], got[p]) for p in got)


def test_dare_is_unbiased_over_keys_and_identity_at_p0():
  tau = {"llm": {"layers": {"w": jnp.asarray(np.random.RandomState(4).randn(2, 3, 5),
                                             jnp.float32)}}}
  keys = jax.random.split(jax.random.key(0), 10_000)
  draws = jax.jit(jax.vmap(lambda k: merging.dare(tau, 0.9, k)))(keys)["llm"]["layers"]["w"]
  mean, t = np.asarray(draws, np.float64).mean(0), np.asarray(tau["llm"]["layers"]["w"])
  # per entry: std of the mean = |tau| sqrt(p / (1 - p) / 10^4) = 0.03 |tau|; allow 5 sigma
  np.testing.assert_array_less(np.abs(mean - t), 5 * 0.03 * np.abs(t) + 1e-7)
  same = merging.dare(tau, 0.0, jax.random.key(1))["llm"]["layers"]["w"]
  assert same.dtype == jnp.float32 and np.array_equal(same, tau["llm"]["layers"]["w"])


def test_dare_merge_sparsifies_each_task_then_merges():
  rng = np.random.RandomState(5)
  t0, taus = _tree(rng), [_tree(rng, 0.1) for _ in range(2)]
  key = jax.random.key(3)
  dropped = [merging.dare(t, 0.5, jax.random.fold_in(key, i)) for i, t in enumerate(taus)]
  for merge, kw, fn in (("task_arithmetic", {"lam": 0.5}, merging.task_arithmetic),
                        ("ties", {"k": 0.5, "lam": 1.0}, merging.ties_merge)):
    got = merging.dare_merge(t0, taus, 0.5, key, merge=merge, **kw)
    want = fn(t0, dropped, **kw)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)))
  plain = merging.dare_merge(t0, taus, 0.0, key, lam=1.0)
  ref = merging.task_arithmetic(t0, taus, 1.0)
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(ref)))


def test_merge_bad_inputs_are_clear_errors():
  rng = np.random.RandomState(6)
  t0, tau = _tree(rng), _tree(rng)
  for p in (1.0, -0.1, 1.5):
    with pytest.raises(ValueError, match=r"p must be in \[0, 1\)"):
      merging.dare(tau, p, jax.random.key(0))
  for k in (0.0, -0.2, 1.5):
    with pytest.raises(ValueError, match=r"k \(fraction kept\) must be in \(0, 1\]"):
      merging.ties_merge(t0, [tau], k=k)
  with pytest.raises(ValueError, match="scope must be 'global' or 'tensor'"):
    merging.ties_merge(t0, [tau], scope="layer")
  with pytest.raises(ValueError, match="merge must be one of"):
    merging.dare_merge(t0, [tau], merge="mean")
  with pytest.raises(ValueError, match="non-empty list"):
    merging.task_arithmetic(t0, [])
  bad = jax.tree.map(lambda x: x, tau)
  bad["llm"]["layers"]["norm"]["scale"] = jnp.zeros((2, 5))
  with pytest.raises(ValueError, match=r"'llm/layers/norm/scale'.*taus\[1\] \(2, 5\)"):
    merging.ties_merge(t0, [tau, bad])
  with pytest.raises(ValueError, match=r"'llm/layers/norm/scale'.*thetas\[0\] \(2, 5\)"):
    merging.task_vectors(t0, [bad])
  nan = jax.tree.map(lambda x: x, tau)
  nan["projector"]["linear_1"]["bias"] = jnp.full((9,), jnp.nan)
  with pytest.raises(ValueError, match="non-finite values at 'projector/linear_1/bias'"):
    merging.ties_merge(t0, [nan])


# ----------------------------------------------------------------------------- configs
@pytest.mark.parametrize("name,fn,extra", [
    ("wise_ft", merging.wise_ft, {"sweep"}),
    ("task_arithmetic", merging.task_arithmetic, {"sweep"}),
    ("ties", merging.ties_merge, set()),
    ("dare", merging.dare_merge, {"seed", "lam"}),
])
def test_post_hoc_configs_name_their_function_arguments(name, fn, extra):
  cfg = importlib.import_module(f"configs.methods.{name}").get_config()
  assert cfg.name == name
  fields = set(cfg.to_dict()) - {"name"} - extra
  assert fields and fields <= set(inspect.signature(fn).parameters), fields
  defaults = {"wise_ft": ("alpha", 0.5), "ties": ("k", 0.2), "dare": ("p", 0.9),
              "task_arithmetic": ("lam", 0.4)}
  assert cfg[defaults[name][0]] == defaults[name][1]
