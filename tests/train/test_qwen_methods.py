"""Every tuning method, forgetting penalty and post-hoc merge on Qwen2.5-VL batches: a tiny
checkpoint directory saved by transformers, LLaVA-format JSON with images of many sizes and a
two-image sample -> one packed batch (the batch's patch rows with their vision ids, pack tables,
(3, B, T) M-RoPE positions) -> prepare + one jitted train step per method (trained entries move,
masked ones never do), penalties with importance computed from that batch (whose per-sample split
gives the packed logits), and WiSE-FT / DARE / TIES of a tuned model."""
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
from mllm_tune.losses.token import token_ce
from mllm_tune.models import model_kwargs
from mllm_tune.posthoc import merging
from mllm_tune.train import build, penalty_setup
from mllm_tune.train.step import TrainState, train_step
from tests.helpers import qwen_vl_tiny as qt
from tests.helpers.data import image_bytes, write_llava_dataset
from tests.helpers.tiny_models import assert_masked_entries_fixed

# Compile time is most of this file's time on CPU: steps are compiled without LLVM's expensive
# optimisation passes (the same program, just less optimised machine code).
FAST_COMPILE = {"xla_backend_optimization_level": 0}
SIZES_WH = [(70, 40), (30, 30), (50, 90), (100, 60), (112, 84), (40, 120)]
LORA_QV = r"llm/layers_\d+/attn/(q|v)_proj"
CONNECTOR = ("params/projector/linear_1/kernel", "params/projector/linear_2/kernel")


def _records(n: int = 8):
  """One image, one image, two images, text only, ... (images of six sizes)."""
  records, images = [], {}
  words = ["a", "cat", "dog", "blue", "red", "square"]
  for i in range(n):
    names = []
    for j in range((1, 1, 2, 0)[i % 4]):
      w, h = SIZES_WH[(i + j) % len(SIZES_WH)]
      names.append(f"im{i}_{j}.png")
      images[names[-1]] = image_bytes(w, h, seed=i * 7 + j)
    q = " ".join(["<image>"] * len(names) + ["what", "is", "this"][:1 + i % 3])
    a = " ".join(words[(i + k) % len(words)] for k in range(2 + i % 4))
    rec = {"id": str(i), "conversations": [{"from": "human", "value": q},
                                           {"from": "gpt", "value": a}]}
    if names:
      rec["image"] = names[0] if len(names) == 1 else names
    records.append(rec)
  return records, images


def _answered_samples(batch: dict) -> list[tuple[int, np.ndarray]]:
  """(row, columns) of every packed sample with answer tokens, in row-major order."""
  seg, loss = np.asarray(batch["segment_ids"]), np.asarray(batch["loss_mask"])
  out = []
  for r in range(seg.shape[0]):
    for s in range(1, int(seg[r].max()) + 1):
      cols = np.flatnonzero(seg[r] == s)
      if loss[r, cols[1:]].any():
        out.append((r, cols))
  return out


@pytest.fixture(scope="module")
def qw(tmp_path_factory):
  """The tiny Qwen2.5-VL (model, params, its directory) and one packed batch."""
  root = tmp_path_factory.mktemp("qwen")
  d, _, _ = qt.model_dir(str(root), "qwen2_5_vl")
  model, params = mt.load_pretrained(d)
  records, images = _records()
  path = write_llava_dataset(str(root / "data"), records, images)
  cfg = dict(kind="llava_json", json_path=path, image_folder=str(root / "data" / "images"),
             seq_len=160, batch_size=3, packing=True, shuffle=False, prefetch=0,
             on_error="raise")
  batch = {k: jnp.asarray(v) for k, v in next(make_batches(cfg, d, model.config)).items()}
  logits = jax.jit(lambda p, b: model.apply({"params": p}, b["input_ids"], **model_kwargs(b)))
  return types.SimpleNamespace(model=model, params=params, dir=d, batch=batch, logits=logits)


def _compiled_step(run, batch, consts=None):
  state = TrainState(jnp.int32(0), run.trainable, run.optimizer.init(run.trainable),
                     jax.random.key(2))
  fn = lambda frozen, st, b, c: train_step(run.fns, frozen, st, b, penalty_consts=c)
  step = jax.jit(fn).lower(run.frozen, state, batch, consts).compile(FAST_COMPILE)
  return functools.partial(step, run.frozen), state


def _train(qw, method, steps: int = 1, lr: float = 1e-2, penalty=None, consts=None):
  """prepare (when needed) + `steps` jitted train steps of `method` on the Qwen batch ->
  (prepared method, variables before, mask, [variables after each step], [metrics per step])."""
  variables = method.init_variables(jax.random.key(1), qw.params)
  method = build.prepare_method(method, qw.model, variables, [qw.batch])
  mask, n = build.trainable_mask(method, variables, log=False)
  assert n > 0
  run = build.assemble(qw.model, method, variables, mask, optax.adam(lr), penalty=penalty)
  step, state = _compiled_step(run, qw.batch, consts)
  afters, metrics = [], []
  for _ in range(steps):
    state, m = step(state, qw.batch, consts)
    afters.append(mt.tuning.combine(state.trainable, run.frozen))
    metrics.append({k: float(v) for k, v in m.items()})
  return method, variables, mask, afters, metrics


def _changed(before: dict, after: dict) -> set[str]:
  fa = pytree.flatten(after)
  return {p for p, x in pytree.flatten(before).items()
          if not np.array_equal(np.asarray(x), np.asarray(fa[p]))}


def test_the_batch_packs_samples_with_images_of_different_sizes_and_a_two_image_sample(qw):
  b, image_id = qw.batch, qw.model.config.image_token_id
  ids, seg = np.asarray(b["input_ids"]), np.asarray(b["segment_ids"])
  assert int(seg.max()) >= 2 and b["positions"].shape == (3,) + ids.shape
  runs = lambda x: int(np.sum(np.diff(np.concatenate([[0], x == image_id, [0]])) == 1))
  images_per_sample = [runs(ids[r, seg[r] == s])
                       for r in range(ids.shape[0]) for s in range(1, int(seg[r].max()) + 1)]
  assert 2 in images_per_sample and 0 in images_per_sample
  assert len(np.unique(np.asarray(b["vision_segment_ids"]))) >= 5  # 4+ images + padding
  assert "vision_window_ids" in b


# ----------------------------------------------------------------------------- every method
def _get(name, **kw):
  return lambda: mt.tuning.get(name, **kw)


METHODS = {  # case: (method factory, leaves that must move in the step)
    "adapter": (_get("adapter", bottleneck=4), ()),
    "bitfit": (_get("bitfit"), ("params/projector/linear_1/bias",)),
    "dora": (_get("dora", rank=2), ()),
    "freeze": (_get("freeze"), CONNECTOR + ("params/vision/patch_embed/kernel",)),
    "freeze-projector": (_get("freeze", preset="projector"), CONNECTOR),
    "grad_topk": (_get("grad_topk", density=0.02, targets=r"llm/.*|projector/.*"), ()),
    "hft-projector-full": (_get("hft", seed=1, projector="full"), CONNECTOR),
    "ia3": (_get("ia3"), ()),
    "llama_adapter": (_get("llama_adapter", adapter_len=2, adapter_layers=1), ()),
    "ln_tuning": (_get("ln_tuning", preset="ln_paper"), CONNECTOR),
    "lora": (_get("lora", rank=2, targets=LORA_QV), ()),
    "lora+connector": (lambda: mt.tuning.compose(mt.tuning.get("lora", rank=2, targets=LORA_QV),
                                                 mt.tuning.get("freeze", preset="projector")),
                       CONNECTOR),
    "lorasculpt": (_get("lorasculpt", rank=2, alpha=4.0, dropout=0.0, t0=1), ()),
    "model_tailor": (_get("model_tailor"), ()),  # post-hoc: trains nothing
    "parallel_adapter": (_get("parallel_adapter", bottleneck=4), ()),
    "pissa": (_get("pissa", rank=2), ()),
    "prefix_tuning": (_get("prefix_tuning", num_virtual_tokens=3, encoder_hidden_size=8), ()),
    "prompt_tuning": (_get("prompt_tuning", num_virtual_tokens=3), ()),
    "rslora": (_get("rslora", rank=2), ()),
    "spider": (_get("spider", targets=r"llm/layers_1/.*|projector/.*"), CONNECTOR),
    "vera": (_get("vera", rank=4), ()),
    "vpt": (_get("vpt", num_tokens=2), ()),  # CLIP-style towers only: refused on Qwen
}


def test_the_cases_cover_every_registered_method():
  assert {c.split("-")[0].split("+")[0] for c in METHODS} == set(mt.tuning.names())


@pytest.mark.parametrize("case", sorted(METHODS))
def test_every_method_prepares_and_steps_on_qwen_batches(qw, case):
  make, must_move = METHODS[case]
  method = make()
  if case == "model_tailor":  # trains nothing; tailoring a tuned model is tested below
    with pytest.raises(mt.tuning.MethodError, match="trains nothing"):
      build.trainable_mask(method, {"params": qw.params, "adapters": {}}, log=False)
    return
  if case == "vpt":  # prompt tokens need a CLIP / SigLIP tower's token sequence
    with pytest.raises(mt.tuning.MethodError, match="needs a vision tower.*LLaVA models only"):
      method.init_variables(jax.random.key(1), qw.params)
    return
  method, before, mask, (after,), (metrics,) = _train(qw, method)
  assert np.isfinite(metrics["loss"]) and metrics["loss"] > 0
  assert_masked_entries_fixed(before, after, mask)  # frozen entries bit-identical, some moved
  changed = _changed(before, after)
  assert set(must_move) <= changed, sorted(set(must_move) - changed)
  trained = {p for p, m in pytree.flatten(mask).items() if pytree.mask_any(m)}
  assert changed <= trained
  if case in ("freeze-projector", "lora+connector"):  # the merger and nothing else of the base
    assert {p for p in trained if p.startswith("params/")} == {
        p for p in pytree.flatten(before) if p.startswith("params/projector/")}
  if case == "grad_topk":  # the mask was scored on the batch cut into its samples
    kept = sum(int(np.sum(m)) for m in jax.tree.leaves(mask))
    candidates = sum(int(np.size(x)) for p, x in pytree.flatten(before).items()
                     if p.startswith(("params/llm/", "params/projector/")))
    assert kept == round(0.02 * candidates)


# ----------------------------------------------------------------------------- sample split
def test_samples_cut_from_the_packed_batch_give_its_logits(qw):
  """Fisher / MAS (`lm_logits_fn` on one sample) and grad_topk (`sample_batches` ->
  `nll_loss`, several samples with their own patch rows at once) see each sample as the packed
  batch does: same logits at its positions (1e-5), same summed NLL."""
  model, params, batch = qw.model, qw.params, qw.batch
  packed = np.asarray(qw.logits(params, batch))
  tok, seq = fisher.image_spec(model)
  assert (tok, seq) == (model.config.image_token_id, 4)
  examples = fisher.split_examples(batch, tok, seq)
  stacked = fisher.stack_examples(examples, tok, seq)
  one = jax.jit(lambda p, ex: fisher.lm_logits_fn(model)({"params": p}, ex)[0])
  together = np.asarray(qw.logits(params, fisher.examples_batch(stacked, seq)))
  samples = _answered_samples(batch)
  assert len(samples) >= 6 and stacked["pixel_values"].shape[0] == len(samples)
  assert stacked["positions"].shape[:2] == (len(samples), 3)
  assert sum(len(e["images"]) for e in examples) == int((batch["vision_segment_ids"] > 0).sum())
  for i, (r, cols) in enumerate(samples):
    ex = {k: v[i] for k, v in stacked.items()}
    assert len(cols) == int(ex["attention_mask"].sum())
    want = packed[r, cols]
    np.testing.assert_allclose(np.asarray(one(params, ex))[:len(cols) - 1], want[:-1],
                               atol=1e-5, rtol=0)
    np.testing.assert_allclose(together[i, :len(cols)], want, atol=1e-5, rtol=0)
  nll_packed = float(token_ce(jnp.asarray(packed), batch["input_ids"], batch["loss_mask"])[0])
  nll_samples = float(jax.jit(build.nll_loss(model, per_token=False))({"params": params},
                                                                        stacked))
  np.testing.assert_allclose(nll_samples, nll_packed, rtol=1e-5)


# ----------------------------------------------------------------------------- penalties
@pytest.fixture(scope="module")
def importance(qw):
  """Empirical Fisher of the leaves LoRA on q/v changes, from the Qwen batch."""
  lora = mt.tuning.get("lora", rank=2, targets=LORA_QV)
  variables = lora.init_variables(jax.random.key(1), qw.params)
  leaves, changed = penalty_setup.changed_leaves(lora, variables, qw.params)
  assert sorted(changed) == ["params/llm/layers/attn/q_proj/kernel",
                             "params/llm/layers/attn/v_proj/kernel"]
  base = {"params": qw.params, "adapters": {}}
  return fisher.fisher_from_batches(qw.model, base, leaves, [qw.batch], "empirical",
                                    num_examples=16, chunk=3)


PENALTIES = {"ewc": (dict(weight=1e3), True), "l2sp": (dict(weight=10.0), False),
             "lwf": (dict(), False)}


@pytest.mark.parametrize("name", sorted(PENALTIES))
def test_penalties_with_lora_on_qwen_batches(qw, importance, name):
  opts, uses_fisher = PENALTIES[name]
  imp = None
  if uses_fisher:
    imp, n = importance
    assert n == len(_answered_samples(qw.batch))  # every sample of the batch
    for x in imp.values():
      assert np.isfinite(np.asarray(x)).all() and float(np.sum(x)) > 0
  lora = mt.tuning.get("lora", rank=2, targets=LORA_QV)
  variables = lora.init_variables(jax.random.key(1), qw.params)
  penalty = penalties.get(name, **opts)
  bound, consts = penalties.bind(penalty, lora, variables, qw.params, imp)
  _, _, _, afters, metrics = _train(qw, lora, steps=2, penalty=bound, consts=consts)
  terms = [m[f"loss_terms/{name}"] for m in metrics]
  for m, t in zip(metrics, terms):
    assert np.isfinite(m["loss"])
    np.testing.assert_allclose(m["loss"], m["ce"] + t, rtol=1e-5)
  if name == "lwf":  # at theta0: the teacher's cross-entropy with itself at T = 2
    assert terms[0] > 0.5 and terms[1] > 0.5
  else:  # 0 at theta0 (LoRA B = 0), then it grows
    assert abs(terms[0]) < 1e-6 < terms[1]
  if penalty.family == "quadratic":  # step 2 logs the term at step 1's merged weights
    w, w0 = pytree.flatten(lora.merge(afters[0])), pytree.flatten(qw.params)
    want = 0.0
    for p in bound.weighted:
      f = 1.0 if imp is None else np.asarray(imp[p], np.float64)
      d = np.asarray(w[p[len("params/"):]], np.float64) - np.asarray(w0[p[len("params/"):]])
      want += penalty.coef * float(np.sum(f * d * d))
    np.testing.assert_allclose(terms[1], want, rtol=1e-4)
  assert not _changed(variables["params"], afters[-1]["params"])  # LoRA: the base stays


# ----------------------------------------------------------------------------- post-hoc
@pytest.fixture(scope="module")
def tuned(qw):
  """theta0 and theta_ft: LoRA on q/v + the merger, 2 steps, merged."""
  method = mt.tuning.compose(mt.tuning.get("lora", rank=2, targets=LORA_QV),
                             mt.tuning.get("freeze", preset="projector"))
  method, _, _, afters, _ = _train(qw, method, steps=2)
  return qw.params, method.merge(afters[-1])


def test_merges_of_a_tuned_model_give_finite_logits_on_qwen_batches(qw, tuned):
  theta0, theta_ft = tuned
  real = np.asarray(qw.batch["attention_mask"]).astype(bool)
  logits = lambda p: np.asarray(qw.logits(p, qw.batch))[real]
  z0, zft = logits(theta0), logits(theta_ft)
  assert np.abs(zft - z0).max() > 1e-3
  tau = merging.task_vectors(theta0, [theta_ft])[0]
  merged = {
      "wise_ft": merging.wise_ft(theta0, theta_ft, 0.5),
      "dare": merging.dare_merge(theta0, [tau], p=0.5, key=jax.random.key(3)),
      "ties": merging.ties_merge(theta0, [tau, merging.dare(tau, 0.5, jax.random.key(4))],
                                 k=0.5),
  }
  for name, params in merged.items():
    z = logits(params)
    assert np.isfinite(z).all(), name
    assert np.abs(z - z0).max() > 1e-4 and np.abs(z - zft).max() > 1e-4, name
  k = "projector/linear_1/kernel"
  np.testing.assert_allclose(pytree.flatten(merged["wise_ft"])[k],
                             (pytree.flatten(theta0)[k] + pytree.flatten(theta_ft)[k]) / 2,
                             atol=1e-6)
  np.testing.assert_array_equal(logits(merging.wise_ft(theta0, theta_ft, 1.0)), zft)
  np.testing.assert_array_equal(logits(merging.wise_ft(theta0, theta_ft, 0.0)), z0)


def test_model_tailor_on_qwen_calibration_batches(qw, tuned):
  theta0, theta_ft = tuned
  out = mt.tuning.get("model_tailor").tailor(qw.model, theta0, theta_ft, [qw.batch])
  flat0, flat_ft, flat = (pytree.flatten(t) for t in (theta0, theta_ft, out))
  for p in ("llm/layers/attn/q_proj/kernel", "llm/layers/attn/v_proj/kernel"):
    assert not np.array_equal(flat[p], flat_ft[p]) and not np.array_equal(flat[p], flat0[p])
  for p in flat:
    if p.startswith("projector/"):  # reset to theta0, as the released code
      np.testing.assert_array_equal(flat[p], flat0[p])
  z = np.asarray(qw.logits(out, qw.batch))
  assert np.isfinite(z).all() and np.abs(z - np.asarray(qw.logits(theta_ft, qw.batch))).max() > 0
