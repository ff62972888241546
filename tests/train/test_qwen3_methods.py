"""Tuning methods, a forgetting penalty and post-hoc merges on Qwen3-VL batches (deepstack
features added after the LLM's first blocks, 16-pixel patches): a tiny checkpoint saved by
transformers + LLaVA JSON -> one packed batch -> one jitted train step per method family (exactly
the intended leaves move, frozen entries stay bit-identical, the loss is finite), EWC with the
Fisher of the batch, WiSE-FT of a tuned model, and Model Tailor, whose per-block pass carries the
deepstack input (the chained blocks give the model's logits); and, at the end, every registered
method one step on the packed batch the other families' sweeps use."""
from __future__ import annotations

import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mllm_tune as mt
from mllm_tune import penalties, pytree
from mllm_tune.data.loader import make_batches
from mllm_tune.importance import fisher
from mllm_tune.models import model_kwargs
from mllm_tune.models.layers import RMSNorm
from mllm_tune.posthoc import merging
from mllm_tune.train import build, penalty_setup
from mllm_tune.train.step import TrainState, train_step
from mllm_tune.tuning.selective import model_tailor as mtl
from tests.helpers import method_steps as ms
from tests.helpers import qwen_vl_tiny as qt
from tests.helpers.data import image_bytes, write_llava_dataset
from tests.helpers.tiny_models import assert_masked_entries_fixed

# Compile time is most of this file's time on CPU: steps compile without LLVM's expensive passes.
FAST_COMPILE = {"xla_backend_optimization_level": 0}
LORA_QV = r"llm/layers_\d+/attn/(q|v)_proj"
Q, V = "adapters/llm/layers/attn/q_proj/", "adapters/llm/layers/attn/v_proj/"


def _records():
  """Two images, one image, text only, one image (four sizes)."""
  sizes, records, images = [(70, 40), (50, 90), (112, 84), (40, 120)], [], {}
  for i, n in enumerate((2, 1, 0, 1)):
    names = [f"im{i}_{j}.png" for j in range(n)]
    for j, name in enumerate(names):
      images[name] = image_bytes(*sizes[(i + j) % len(sizes)], seed=i * 7 + j)
    rec = {"id": str(i), "conversations": [
        {"from": "human", "value": " ".join(["<image>"] * n + ["what", "is", "this"][:1 + i])},
        {"from": "gpt", "value": " ".join(["a", "red", "cat", "dog", "blue"][i:i + 3])}]}
    if names:
      rec["image"] = names if n > 1 else names[0]
    records.append(rec)
  return records, images


@pytest.fixture(scope="module")
def q3(tmp_path_factory):
  """The tiny Qwen3-VL (model, params) and one packed batch of the four records."""
  root = tmp_path_factory.mktemp("qwen3")
  d, _, _ = qt.model_dir(str(root), "qwen3_vl")
  model, params = mt.load_pretrained(d)
  path = write_llava_dataset(str(root / "data"), *_records())
  cfg = dict(kind="llava_json", json_path=path, image_folder=str(root / "data" / "images"),
             seq_len=128, batch_size=2, packing=True, shuffle=False, prefetch=0,
             on_error="raise")
  batch = {k: jnp.asarray(v) for k, v in next(make_batches(cfg, d, model.config)).items()}
  assert int(batch["segment_ids"].max()) >= 2 and int(batch["vision_segment_ids"].max()) >= 2
  logits = jax.jit(lambda p, b: model.apply({"params": p}, b["input_ids"], **model_kwargs(b)))
  return types.SimpleNamespace(model=model, params=params, batch=batch, logits=logits)


def _train(q3, method, steps: int = 1, penalty=None, consts=None):
  """prepare + `steps` jitted Adam steps -> (variables before, mask, [after], [metrics])."""
  variables = method.init_variables(jax.random.key(1), q3.params)
  method = build.prepare_method(method, q3.model, variables, [q3.batch])
  mask, _ = build.trainable_mask(method, variables, log=False)
  run = build.assemble(q3.model, method, variables, mask, optax.adam(1e-2), penalty=penalty)
  state = TrainState(jnp.int32(0), run.trainable, run.optimizer.init(run.trainable),
                     jax.random.key(2))
  fn = lambda frozen, st, b, c: train_step(run.fns, frozen, st, b, penalty_consts=c)
  step = functools.partial(jax.jit(fn).lower(run.frozen, state, q3.batch, consts)
                           .compile(FAST_COMPILE), run.frozen)
  afters, metrics = [], []
  for _ in range(steps):
    state, m = step(state, q3.batch, consts)
    afters.append(mt.tuning.combine(state.trainable, run.frozen))
    metrics.append({k: float(v) for k, v in m.items()})
  return method, variables, mask, afters, metrics


def _changed(before: dict, after: dict) -> set[str]:
  fa = pytree.flatten(after)
  return {p for p, x in pytree.flatten(before).items()
          if not np.array_equal(np.asarray(x), np.asarray(fa[p]))}


def _biases(q3) -> set[str]:
  return {f"params/{p}" for p in pytree.flatten(q3.params) if p.endswith("/bias")}


# case: (method, trained leaves, leaves the first step moves: LoRA's A gets no gradient while B
# is 0; None = all trained ones)
METHODS = {
    "lora": (lambda: mt.tuning.get("lora", rank=2, targets=LORA_QV),
             lambda q3: {Q + "lora_a", Q + "lora_b", V + "lora_a", V + "lora_b"},
             {Q + "lora_b", V + "lora_b"}),
    "dora": (lambda: mt.tuning.get("dora", rank=2),
             lambda q3: {p + s for p in (Q, V) for s in ("lora_a", "lora_b", "dora_m")},
             {p + s for p in (Q, V) for s in ("lora_b", "dora_m")}),
    "ia3": (lambda: mt.tuning.get("ia3"),
            lambda q3: {"adapters/llm/layers/attn/k_proj/ia3_out",
                        "adapters/llm/layers/attn/v_proj/ia3_out",
                        "adapters/llm/layers/mlp/down_proj/ia3_in"}, None),
    "bitfit": (lambda: mt.tuning.get("bitfit"), _biases, None),  # vision, mergers, deepstack
    "prompt_tuning": (lambda: mt.tuning.get("prompt_tuning", num_virtual_tokens=3),
                      lambda q3: {"adapters/llm/prompt_embeddings"}, None),
}


@pytest.mark.parametrize("case", sorted(METHODS))
def test_method_families_step_on_qwen3_batches(q3, case):
  make, trained_of, moves = METHODS[case]
  _, before, mask, (after,), (metrics,) = _train(q3, make())
  assert np.isfinite(metrics["loss"]) and metrics["loss"] > 0
  trained = {p for p, m in pytree.flatten(mask).items() if pytree.mask_any(m)}
  assert trained == trained_of(q3)
  assert_masked_entries_fixed(before, after, mask)  # frozen entries bit-identical
  assert _changed(before, after) == (trained if moves is None else moves)
  if case == "bitfit":  # the deepstack mergers get gradients through the LLM's first blocks
    assert {p for p in trained if "/deepstack_" in p} and len(trained) == 16


def test_ewc_with_lora_on_qwen3_batches(q3):
  """Empirical Fisher of the leaves LoRA on q/v changes, from the batch's samples: the EWC term
  is 0 at theta0, then the Fisher-weighted distance of step 1's merged weights."""
  lora = mt.tuning.get("lora", rank=2, targets=LORA_QV)
  variables = lora.init_variables(jax.random.key(1), q3.params)
  leaves, changed = penalty_setup.changed_leaves(lora, variables, q3.params)
  assert sorted(changed) == ["params/llm/layers/attn/q_proj/kernel",
                             "params/llm/layers/attn/v_proj/kernel"]
  imp, n = fisher.fisher_from_batches(q3.model, {"params": q3.params, "adapters": {}}, leaves,
                                      [q3.batch], "empirical", num_examples=8, chunk=4)
  assert n == 4 and all(float(np.sum(x)) > 0 for x in imp.values())
  penalty = penalties.get("ewc", weight=1e3)
  bound, consts = penalties.bind(penalty, lora, variables, q3.params, imp)
  _, _, _, afters, metrics = _train(q3, lora, steps=2, penalty=bound, consts=consts)
  terms = [m["loss_terms/ewc"] for m in metrics]
  for m, t in zip(metrics, terms):
    assert np.isfinite(m["loss"])
    np.testing.assert_allclose(m["loss"], m["ce"] + t, rtol=1e-5)
  w, w0 = pytree.flatten(lora.merge(afters[0])), pytree.flatten(q3.params)
  want = sum(float(np.sum(np.asarray(imp[p], np.float64) * np.square(
      np.asarray(w[p[7:]], np.float64) - np.asarray(w0[p[7:]], np.float64))))
      for p in bound.weighted)
  assert abs(terms[0]) < 1e-6 < terms[1]
  np.testing.assert_allclose(terms[1], penalty.coef * want, rtol=1e-4)


@pytest.fixture(scope="module")
def tuned(q3):
  """theta0 and a theta_ft that moved where LoRA on q/v + the mergers (deepstack ones too)
  would: Gaussian steps of 0.05 on those leaves (merges and Model Tailor read only the weights;
  a real run's step would cost one more compile here, the Qwen2.5-VL file trains one)."""
  flat = pytree.flatten(q3.params)
  moved = [p for p in flat if p.startswith("projector/")
           or p in ("llm/layers/attn/q_proj/kernel", "llm/layers/attn/v_proj/kernel")]
  rng = np.random.RandomState(5)
  ft = {**flat, **{p: flat[p] + 0.05 * rng.randn(*np.shape(flat[p])).astype(np.float32)
                   for p in moved}}
  return q3.params, pytree.unflatten(ft)


def test_wise_ft_of_a_tuned_qwen3(q3, tuned):
  theta0, theta_ft = tuned
  real = np.asarray(q3.batch["attention_mask"]).astype(bool)
  logits = lambda p: np.asarray(q3.logits(p, q3.batch))[real]
  z0, zft, zhalf = (logits(p) for p in (theta0, theta_ft, merging.wise_ft(theta0, theta_ft,
                                                                           0.5)))
  assert np.isfinite(zhalf).all() and np.abs(zft - z0).max() > 1e-3
  assert np.abs(zhalf - z0).max() > 1e-4 and np.abs(zhalf - zft).max() > 1e-4
  half, f0, fft = (pytree.flatten(t) for t in (merging.wise_ft(theta0, theta_ft, 0.5), theta0,
                                               theta_ft))
  for k in ("projector/deepstack_1/linear_1/kernel", "llm/layers/attn/q_proj/kernel"):
    assert not np.array_equal(f0[k], fft[k])
    np.testing.assert_allclose(half[k], (f0[k] + fft[k]) / 2, atol=1e-6)
  np.testing.assert_array_equal(logits(merging.wise_ft(theta0, theta_ft, 1.0)), zft)


def test_model_tailor_threads_deepstack_through_its_block_pass(q3, tuned):
  theta0, theta_ft = tuned
  model, batch = q3.model, q3.batch
  # the per-block pass, chained over every block, is the model's stack (deepstack included)
  state = mtl.block_inputs_fn(model)(theta_ft, batch)
  assert state[3] is not None and state[3].shape[0] == 2  # deepstack layers [0, 2]
  tm = np.asarray(batch["attention_mask"]) > 0
  block = mtl.block_pass_fn(model.config.llm)

  def chain(s):  # -> logits at the real tokens: final norm and head applied to the last block
    for layer in range(model.config.llm.num_layers):
      s = (block(mtl.layer_slice(theta_ft["llm"]["layers"], layer), s, tm,
                 jnp.int32(layer))[0], *s[1:])
    h = RMSNorm(model.config.llm.rms_norm_eps).apply(
        {"params": theta_ft["llm"]["final_norm"]}, s[0])
    return np.asarray(h @ theta_ft["llm"]["lm_head"]["kernel"])[tm]

  logits = np.asarray(q3.logits(theta_ft, batch))[tm]
  np.testing.assert_allclose(chain(state), logits, atol=1e-4, rtol=0)
  assert np.abs(chain((*state[:3], None)) - logits).max() > 1e-2  # without it: not the model
  out = mt.tuning.get("model_tailor").tailor(model, theta0, theta_ft, [batch])
  flat0, flat_ft, flat = (pytree.flatten(t) for t in (theta0, theta_ft, out))
  for p in ("llm/layers/attn/q_proj/kernel", "llm/layers/attn/v_proj/kernel"):
    assert not np.array_equal(flat[p], flat_ft[p]) and not np.array_equal(flat[p], flat0[p])
  for p in flat:
    if p.startswith("projector/"):  # the mergers, deepstack ones too, reset to theta0
      np.testing.assert_array_equal(flat[p], flat0[p])
  assert np.isfinite(np.asarray(q3.logits(out, batch))).all()


# ----------------------------------------------------------------------------- every method
@pytest.fixture(scope="module")
def q3_env(tmp_path_factory):
  """The tiny Qwen3-VL on `sized_records()`'s packed batch (six image sizes, a two-image
  sample), as the other families' method sweeps use it."""
  root = tmp_path_factory.mktemp("qwen3_sweep")
  d, hf, proc = qt.model_dir(str(root), "qwen3_vl")
  return ms.packed_env(root, d, hf=hf, proc=proc)


ALL_METHODS = ms.method_cases(ms.PROJECTOR, "params/vision/patch_embed/kernel", "", ())


def test_the_sweep_covers_every_registered_method():
  ms.assert_cases_cover_every_method(ALL_METHODS)


@pytest.mark.parametrize("case", sorted(ALL_METHODS))
def test_every_method_prepares_and_steps_on_qwen3_batches(q3_env, case):
  ms.check_qwen_method_step(q3_env, ALL_METHODS, case)
