"""Every tuning method, forgetting penalty and post-hoc merge on LLaVA-OneVision (anyres) batches:
a tiny checkpoint directory saved by transformers, LLaVA-format JSON with images of many sizes and
a two-image sample -> one packed batch (crops of the whole batch, position-aligned pack tables)
-> prepare + one jitted train step per method (trained entries move, masked ones never do),
penalties with importance computed from that batch (whose per-sample split gives the packed
logits), WiSE-FT / DARE / TIES / Model Tailor of a tuned model, and `mt.generate` / DaWin on
`mt.hf_inputs` of two prompts with differently sized images.

GIFT runs in its MLLM form (docs/methods.md §5.3 [choice]): caption NLL and token distillation on
synthetic image-caption pairs, here anyres caption batches."""
from __future__ import annotations

import functools
import io
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from PIL import Image

import mllm_tune as mt
from mllm_tune import penalties, pytree
from mllm_tune.data.loader import make_batches
from mllm_tune.data.pipeline import SamplePreparer
from mllm_tune.data.synthetic_pairs import PairBatches, make_pair_source
from mllm_tune.importance import fisher
from mllm_tune.losses.token import token_ce
from mllm_tune.models import model_kwargs
from mllm_tune.penalties import gift
from mllm_tune.posthoc import dawin, dawin_decoding, merging
from mllm_tune.train import build, penalty_setup
from mllm_tune.train.step import TrainState, train_step
from tests.helpers import anyres_tiny as at
from tests.helpers.data import image_bytes, write_llava_dataset
from tests.helpers.tiny_models import assert_masked_entries_fixed

# Compile time is most of this file's time on CPU: steps are compiled without LLVM's expensive
# optimisation passes (the same program, just less optimised machine code).
FAST_COMPILE = {"xla_backend_optimization_level": 0}
SIZES_WH = [(70, 40), (30, 30), (50, 90), (100, 60), (112, 84), (40, 120)]
LORA_QV = r"llm/layers_\d+/attn/(q|v)_proj"
CONNECTOR = ("params/image_newline", "params/projector/linear_1/kernel",
             "params/projector/linear_2/kernel")


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


def _image_runs(ids_T: np.ndarray, image_id: int) -> list[int]:
  """Lengths of the runs of image tokens in a token row."""
  runs, n = [], 0
  for is_img in list(ids_T == image_id) + [False]:
    if is_img:
      n += 1
    elif n:
      runs.append(n)
      n = 0
  return runs


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
def ov(tmp_path_factory):
  """The tiny OneVision (model, params, its directory and processor) and one packed batch."""
  root = tmp_path_factory.mktemp("onevision")
  d, _, proc = at.model_dir(str(root), "llava_onevision")
  model, params = mt.load_pretrained(d)
  records, images = _records()
  path = write_llava_dataset(str(root / "data"), records, images)
  cfg = dict(kind="llava_json", json_path=path, image_folder=str(root / "data" / "images"),
             seq_len=160, batch_size=3, packing=True, shuffle=False, prefetch=0,
             on_error="raise")
  batch = {k: jnp.asarray(v) for k, v in next(make_batches(cfg, d, model.config)).items()}
  logits = jax.jit(lambda p, b: model.apply({"params": p}, b["input_ids"], **model_kwargs(b)))
  return types.SimpleNamespace(model=model, params=params, dir=d, proc=proc, batch=batch,
                               logits=logits)


def _compiled_step(run, batch, consts=None, penalty_batch=None):
  """`run`'s train step, jitted and compiled for these arguments."""
  state = TrainState(jnp.int32(0), run.trainable, run.optimizer.init(run.trainable),
                     jax.random.key(2))
  fn = lambda frozen, st, b, c, pb: train_step(run.fns, frozen, st, b, penalty_consts=c,
                                               penalty_batch=pb)
  step = jax.jit(fn).lower(run.frozen, state, batch, consts, penalty_batch).compile(FAST_COMPILE)
  return functools.partial(step, run.frozen), state


def _train(ov, method, steps: int = 1, lr: float = 1e-2, penalty=None, consts=None,
           penalty_batch=None):
  """prepare (when needed) + `steps` jitted train steps of `method` on the anyres batch ->
  (prepared method, variables before, mask, [variables after each step], [metrics per step])."""
  variables = method.init_variables(jax.random.key(1), ov.params)
  method = build.prepare_method(method, ov.model, variables, [ov.batch])
  mask, n = build.trainable_mask(method, variables, log=False)
  assert n > 0
  run = build.assemble(ov.model, method, variables, mask, optax.adam(lr), penalty=penalty)
  step, state = _compiled_step(run, ov.batch, consts, penalty_batch)
  afters, metrics = [], []
  for _ in range(steps):
    state, m = step(state, ov.batch, consts, penalty_batch)
    afters.append(mt.tuning.combine(state.trainable, run.frozen))
    metrics.append({k: float(v) for k, v in m.items()})
  return method, variables, mask, afters, metrics


def _changed(before: dict, after: dict) -> set[str]:
  fa = pytree.flatten(after)
  return {p for p, x in pytree.flatten(before).items()
          if not np.array_equal(np.asarray(x), np.asarray(fa[p]))}


def test_the_batch_packs_samples_with_images_of_different_sizes_and_a_two_image_sample(ov):
  b, image_id = ov.batch, ov.model.config.image_token_id
  ids, seg = np.asarray(b["input_ids"]), np.asarray(b["segment_ids"])
  assert int(seg.max()) >= 2 and b["pixel_values"].shape[1:] == (28, 28, 3)
  assert b["pack_index"].shape == ids.shape + (4,) and b["pack_newline"].shape == ids.shape
  runs_per_sample = [_image_runs(ids[r, seg[r] == s], image_id)
                     for r in range(ids.shape[0]) for s in range(1, int(seg[r].max()) + 1)]
  assert any(len(r) == 2 for r in runs_per_sample)               # the two-image sample
  assert any(len(r) == 0 for r in runs_per_sample)               # and a text-only one
  assert len({n for r in runs_per_sample for n in r}) >= 3       # token counts of many sizes
  assert bool(np.asarray(b["pack_newline"]).any())                # image_newline is used


# ----------------------------------------------------------------------------- every method
def _get(name, **kw):
  return lambda: mt.tuning.get(name, **kw)


METHODS = {  # case: (method factory, leaves that must move in the step)
    "adapter": (_get("adapter", bottleneck=4), ()),
    "bitfit": (_get("bitfit"), ("params/projector/linear_1/bias",)),
    "dora": (_get("dora", rank=2), ()),
    "freeze": (_get("freeze"), CONNECTOR + ("params/vision/embed/patch_kernel",)),
    "freeze-projector": (_get("freeze", preset="projector"), CONNECTOR),
    "grad_topk": (_get("grad_topk", density=0.02,
                       targets=r"llm/.*|projector/.*|image_newline"), ()),
    "hft-projector-full": (_get("hft", seed=1, projector="full"), CONNECTOR),
    "ia3": (_get("ia3"), ()),
    "llama_adapter": (_get("llama_adapter", adapter_len=2, adapter_layers=1), ()),
    "ln_tuning": (_get("ln_tuning", preset="ln_paper"), CONNECTOR[1:]),
    "lora": (_get("lora", rank=2, targets=LORA_QV), ()),
    "lora+connector": (lambda: mt.tuning.compose(mt.tuning.get("lora", rank=2, targets=LORA_QV),
                                                 mt.tuning.get("freeze", preset="projector")),
                       CONNECTOR),
    "lorasculpt": (_get("lorasculpt", rank=2, alpha=4.0, dropout=0.0, t0=1), ()),
    "model_tailor": (_get("model_tailor"), ()),  # post-hoc: see test_model_tailor_...
    "parallel_adapter": (_get("parallel_adapter", bottleneck=4), ()),
    "pissa": (_get("pissa", rank=2), ()),
    "prefix_tuning": (_get("prefix_tuning", num_virtual_tokens=3, encoder_hidden_size=8), ()),
    "prompt_tuning": (_get("prompt_tuning", num_virtual_tokens=3), ()),
    "rslora": (_get("rslora", rank=2), ()),
    "spider": (_get("spider", targets=r"llm/layers_1/.*|projector/.*|image_newline"), CONNECTOR),
    "vera": (_get("vera", rank=4), ()),
    "vpt": (_get("vpt", num_tokens=2), ("adapters/vision/prompt_tokens",)),
}


def test_the_cases_cover_every_registered_method():
  assert {c.split("-")[0].split("+")[0] for c in METHODS} == set(mt.tuning.names())


@pytest.mark.parametrize("case", sorted(METHODS))
def test_every_method_prepares_and_steps_on_anyres_batches(ov, case):
  make, must_move = METHODS[case]
  method = make()
  if case == "model_tailor":  # trains nothing; tailoring a tuned model is tested below
    with pytest.raises(mt.tuning.MethodError, match="trains nothing"):
      build.trainable_mask(method, {"params": ov.params, "adapters": {}}, log=False)
    return
  method, before, mask, (after,), (metrics,) = _train(ov, method)
  assert np.isfinite(metrics["loss"]) and metrics["loss"] > 0
  assert_masked_entries_fixed(before, after, mask)  # frozen entries bit-identical, some moved
  changed = _changed(before, after)
  assert set(must_move) <= changed, sorted(set(must_move) - changed)
  trained = {p for p, m in pytree.flatten(mask).items() if pytree.mask_any(m)}
  assert changed <= trained
  if case in ("freeze-projector", "lora+connector"):  # the connector and nothing else base
    assert {p for p in trained if p.startswith("params/")} == {
        p for p in pytree.flatten(before) if p.startswith(("params/projector/",
                                                           "params/image_newline"))}
  if case == "hft-projector-full":  # half the LLM block matrices, the whole connector
    assert all(pytree.mask_any(pytree.flatten(mask)[p]) for p in CONNECTOR)
    assert not pytree.mask_any(mask["params"]["llm"]["embed"]["embedding"])
  if case == "grad_topk":  # the mask was scored on the anyres batch cut into its samples
    kept = sum(int(np.sum(m)) for m in jax.tree.leaves(mask))
    candidates = sum(int(np.size(x)) for p, x in pytree.flatten(before).items()
                     if p.startswith(("params/llm/", "params/projector/", "params/image_newline")))
    assert kept == round(0.02 * candidates)


def test_hft_keeps_image_newline_frozen_unless_the_projector_is_full(ov):
  variables = {"params": ov.params, "adapters": {}}
  for projector, want in (("half", False), ("frozen", False), ("full", True)):
    mask = mt.tuning.get("hft", projector=projector).trainable(variables)
    assert mask["params"]["image_newline"] is want


# ----------------------------------------------------------------------------- sample split
def test_samples_cut_from_the_packed_batch_give_its_logits(ov):
  """Fisher / MAS (`lm_logits_fn` on one sample) and grad_topk (`sample_batches` ->
  `nll_loss`, several samples with their own crops at once) see each sample as the packed batch
  does: same logits at its positions, same summed NLL."""
  model, params, batch = ov.model, ov.params, ov.batch
  packed = np.asarray(ov.logits(params, batch))
  tok, seq = fisher.image_spec(model)
  stacked = fisher.stack_examples(fisher.split_examples(batch, tok, seq), tok, seq)
  one = jax.jit(lambda p, ex: fisher.lm_logits_fn(model)({"params": p}, ex)[0])
  together = np.asarray(ov.logits(params, fisher.examples_batch(stacked,
                                                                model.config.crop_tokens)))
  samples = _answered_samples(batch)
  assert len(samples) >= 6 and stacked["pixel_values"].shape[0] == len(samples)
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
def importance(ov):
  """{kind: (importance of the leaves LoRA on q/v changes, samples)} from the anyres batch."""
  lora = mt.tuning.get("lora", rank=2, targets=LORA_QV)
  variables = lora.init_variables(jax.random.key(1), ov.params)
  leaves, changed = penalty_setup.changed_leaves(lora, variables, ov.params)
  assert sorted(changed) == ["params/llm/layers/attn/q_proj/kernel",
                             "params/llm/layers/attn/v_proj/kernel"]
  base = {"params": ov.params, "adapters": {}}
  return {kind: fisher.fisher_from_batches(ov.model, base, leaves, [ov.batch], kind,
                                           num_examples=16, chunk=3)
          for kind in ("empirical", "mas")}


PENALTIES = {  # name: (options, importance kind)
    "ewc": (dict(weight=1e3), "empirical"), "online_ewc": (dict(weight=1e3, gamma=0.5),
                                                           "empirical"),
    "mas": (dict(weight=1e3), "mas"), "l2sp": (dict(weight=10.0), None),
    "lwf": (dict(), None), "kl": (dict(weight=1.0), None),
}


@pytest.mark.parametrize("name", sorted(PENALTIES))
def test_penalties_with_lora_on_anyres_batches(ov, importance, name):
  opts, kind = PENALTIES[name]
  imp = None
  if kind:
    imp, n = importance[kind]
    assert n == len(_answered_samples(ov.batch))  # every sample of the batch
    for x in imp.values():
      assert np.isfinite(np.asarray(x)).all() and float(np.sum(x)) > 0
    if name == "online_ewc":  # previous stage = this one's Fisher: F~ = gamma F + F
      imp = fisher.online_update(imp, imp, opts["gamma"])
  lora = mt.tuning.get("lora", rank=2, targets=LORA_QV)
  variables = lora.init_variables(jax.random.key(1), ov.params)
  penalty = penalties.get(name, **opts)
  bound, consts = penalties.bind(penalty, lora, variables, ov.params, imp)
  _, _, _, afters, metrics = _train(ov, lora, steps=2, penalty=bound, consts=consts)
  terms = [m[f"loss_terms/{name}"] for m in metrics]
  for m, t in zip(metrics, terms):
    assert np.isfinite(m["loss"])
    np.testing.assert_allclose(m["loss"], m["ce"] + t, rtol=1e-5)
  if name == "lwf":  # at theta0: the teacher's cross-entropy with itself at T = 2
    assert terms[0] > 0.5 and terms[1] > 0.5
  else:  # 0 at theta0 (LoRA B = 0), then it grows
    assert abs(terms[0]) < 1e-6 < terms[1]
  if penalty.family == "quadratic":  # step 2 logs the term at step 1's merged weights
    w, w0 = pytree.flatten(lora.merge(afters[0])), pytree.flatten(ov.params)
    want = 0.0
    for p in bound.weighted:
      f = 1.0 if imp is None else np.asarray(imp[p], np.float64)
      d = np.asarray(w[p[len("params/"):]], np.float64) - np.asarray(w0[p[len("params/"):]])
      want += penalty.coef * float(np.sum(f * d * d))
    np.testing.assert_allclose(terms[1], want, rtol=1e-4)
  assert not _changed(variables["params"], afters[-1]["params"])  # LoRA: the base stays


def test_gift_with_lora_distils_on_anyres_caption_batches(ov):
  """GIFT's MLLM form (docs/methods.md §5.3): synthetic image-caption pairs rendered as
  conversations by the training data's preparer, so on OneVision they are anyres batches (crops +
  pack tables), and its aux pass runs the model on them."""
  prepare = SamplePreparer.from_pretrained(ov.dir, ov.model.config, 96)
  pairs = PairBatches(make_pair_source("procedural", num=8, image_size=60), prepare, 2)
  cap = {k: jnp.asarray(v) for k, v in pairs.batch(0).items()}
  assert prepare.anyres_spec.max_crops == 17  # the base crop + the largest grid, 4 x 4
  assert pairs.spec.max_images == 2 * 17 and "pack_index" in cap
  assert cap["pixel_values"].shape[0] in pairs.spec.crop_buckets
  assert int(np.sum(cap["image_valid"])) > 2  # images of several crops
  lora = mt.tuning.get("lora", rank=2, targets=LORA_QV)
  variables = lora.init_variables(jax.random.key(1), ov.params)
  penalty = penalties.get("gift", weight=1e3, kd_weight=1.0, ita_weight=0.5)
  bound, consts = penalties.bind(penalty, lora, variables, ov.params, model=ov.model)
  _, _, _, afters, metrics = _train(ov, lora, steps=2, penalty=bound, consts=consts,
                                    penalty_batch=cap)
  first, second = metrics
  for m in metrics:
    terms = sum(m[f"loss_terms/gift_{k}"] for k in ("kd", "ita", "awc"))
    assert np.isfinite(m["loss"]) and np.isclose(m["loss"], m["ce"] + terms, rtol=1e-5)
  # step 1 at theta0 = theta_ref: no KD, no AWC; the caption NLL of the model on the crops
  ita = gift.caption_nll(ov.logits(ov.params, cap), cap["input_ids"], cap["loss_mask"])
  np.testing.assert_allclose(first["loss_terms/gift_ita"], 0.5 * float(ita), rtol=1e-4)
  assert first["loss_terms/gift_awc"] == 0.0 and abs(first["loss_terms/gift_kd"]) < 1e-5
  assert second["loss_terms/gift_awc"] > 0 and second["loss_terms/gift_kd"] > 0
  assert not _changed(variables["params"], afters[-1]["params"])


# ----------------------------------------------------------------------------- post-hoc
@pytest.fixture(scope="module")
def tuned(ov):
  """theta0 and theta_ft: LoRA on q/v + the connector, 2 steps, merged."""
  method = mt.tuning.compose(mt.tuning.get("lora", rank=2, targets=LORA_QV),
                             mt.tuning.get("freeze", preset="projector"))
  method, _, _, afters, _ = _train(ov, method, steps=2)
  return ov.params, method.merge(afters[-1])


def test_merges_of_a_tuned_model_give_finite_logits_on_anyres_batches(ov, tuned):
  theta0, theta_ft = tuned
  real = np.asarray(ov.batch["attention_mask"]).astype(bool)
  logits = lambda p: np.asarray(ov.logits(p, ov.batch))[real]
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
  np.testing.assert_allclose(merged["wise_ft"]["image_newline"],
                             (theta0["image_newline"] + theta_ft["image_newline"]) / 2, atol=1e-6)
  np.testing.assert_array_equal(logits(merging.wise_ft(theta0, theta_ft, 1.0)), zft)


def test_model_tailor_on_anyres_calibration_batches(ov, tuned):
  theta0, theta_ft = tuned
  out = mt.tuning.get("model_tailor").tailor(ov.model, theta0, theta_ft, [ov.batch])
  flat0, flat_ft, flat = (pytree.flatten(t) for t in (theta0, theta_ft, out))
  for p in ("llm/layers/attn/q_proj/kernel", "llm/layers/attn/v_proj/kernel"):
    assert not np.array_equal(flat[p], flat_ft[p]) and not np.array_equal(flat[p], flat0[p])
  for p in flat:
    if p.startswith("projector/"):  # reset to theta0, as the released code
      np.testing.assert_array_equal(flat[p], flat0[p])
  np.testing.assert_array_equal(flat["image_newline"], flat_ft["image_newline"])
  z = np.asarray(ov.logits(out, ov.batch))
  assert np.isfinite(z).all() and np.abs(z - np.asarray(ov.logits(theta_ft, ov.batch))).max() > 0


@pytest.fixture(scope="module")
def prompts(ov):
  """`mt.hf_inputs` of the processor's output for two prompts, a wide and a tall image."""
  imgs = [Image.open(io.BytesIO(image_bytes(w, h, seed=i)))
          for i, (w, h) in enumerate([(100, 40), (40, 120)])]
  tok = ov.proc.tokenizer
  texts = [tok.apply_chat_template([{"role": "user", "content": f"<image> {q}"}],
                                   tokenize=False, add_generation_prompt=True)
           for q in ("what is this", "red")]
  tok.padding_side = "left"
  enc = ov.proc(images=[[imgs[0]], [imgs[1]]], text=texts, return_tensors="np", padding=True)
  kw = mt.hf_inputs(ov.model, enc)
  runs = [_image_runs(row, ov.model.config.image_token_id) for row in kw["input_ids"]]
  assert len(runs[0]) == len(runs[1]) == 1 and runs[0] != runs[1]  # different sizes
  return kw


def test_generate_and_dawin_generate_on_hf_inputs_with_two_image_sizes(ov, tuned, prompts):
  theta0, theta_ft = tuned
  vocab = ov.model.config.llm.vocab_size
  new = np.asarray(mt.generate(ov.model, theta0, **prompts, max_new_tokens=4))
  assert new.shape == (2, 4) and ((0 <= new) & (new < vocab)).all()
  same, lam, _ = dawin_decoding.dawin_generate(ov.model, theta0, theta0, **prompts,
                                               max_new_tokens=4, num_components=None)
  np.testing.assert_array_equal(np.asarray(same), new)  # equal models: plain generation
  toks, lam, mixture = dawin_decoding.dawin_generate(ov.model, theta0, theta_ft, **prompts,
                                                     max_new_tokens=4, num_components=None)
  assert mixture is None and lam.shape == (2,) and np.isfinite(lam).all()
  for b in range(2):  # row b is decoded by its own merged model
    want = mt.generate(ov.model, dawin.dawin_interpolate(theta0, theta_ft, lam[b]), **prompts,
                       max_new_tokens=4)
    np.testing.assert_array_equal(np.asarray(toks)[b], np.asarray(want)[b])
