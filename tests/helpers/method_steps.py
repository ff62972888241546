"""Shared pieces of the tests that run every tuning method, penalty and merge on one packed batch
of a tiny transformers-saved checkpoint (train/test_anyres_methods.py: LLaVA-OneVision,
train/test_qwen_methods.py: Qwen2.5-VL): the batch and its jitted logits, prepare + compiled
train steps, the method cases, and the checks both families share (a method's step, a
penalty's terms, merges and Model Tailor of a tuned model, samples cut from the batch)."""
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
from mllm_tune.penalties import gift
from mllm_tune.posthoc import merging
from mllm_tune.train import build, penalty_setup
from mllm_tune.train.step import TrainState, train_step
from tests.helpers.data import packed_cfg, sized_records, write_llava_dataset
from tests.helpers.tiny_models import assert_masked_entries_fixed

# Compile time is most of these files' time on CPU: steps are compiled without LLVM's expensive
# optimisation passes (the same program, just less optimised machine code).
FAST_COMPILE = {"xla_backend_optimization_level": 0}
LORA_QV = r"llm/layers_\d+/attn/(q|v)_proj"
QV_KERNELS = ["params/llm/layers/attn/q_proj/kernel", "params/llm/layers/attn/v_proj/kernel"]
PROJECTOR = ("params/projector/linear_1/kernel", "params/projector/linear_2/kernel")
TUNED = "lora+connector"  # the method case whose 2-step run is the tuned model of the merges


def packed_env(root, model_dir: str, **extra) -> types.SimpleNamespace:
  """(model, params, dir, batch, logits) of a checkpoint directory: `sized_records()` written
  under `root` as LLaVA JSON -> the first packed batch (jnp), a jitted `logits(params, batch)`;
  `extra` is kept as attributes (e.g. the processor)."""
  model, params = mt.load_pretrained(model_dir)
  records, images = sized_records()
  path = write_llava_dataset(str(root / "data"), records, images)
  cfg = packed_cfg(path, str(root / "data" / "images"))
  batch = {k: jnp.asarray(v) for k, v in next(make_batches(cfg, model_dir, model.config)).items()}
  logits = jax.jit(lambda p, b: model.apply({"params": p}, b["input_ids"], **model_kwargs(b)))
  return types.SimpleNamespace(model=model, params=params, dir=model_dir, batch=batch,
                               logits=logits, runs={}, **extra)


def answered_samples(batch: dict) -> list[tuple[int, np.ndarray]]:
  """(row, columns) of every packed sample with answer tokens, in row-major order."""
  seg, loss = np.asarray(batch["segment_ids"]), np.asarray(batch["loss_mask"])
  out = []
  for r in range(seg.shape[0]):
    for s in range(1, int(seg[r].max()) + 1):
      cols = np.flatnonzero(seg[r] == s)
      if loss[r, cols[1:]].any():
        out.append((r, cols))
  return out


def changed(before: dict, after: dict) -> set[str]:
  """Paths of the leaves that differ between two variable trees."""
  fa = pytree.flatten(after)
  return {p for p, x in pytree.flatten(before).items()
          if not np.array_equal(np.asarray(x), np.asarray(fa[p]))}


# ----------------------------------------------------------------------------- train steps
def compiled_step(run, batch, consts=None, penalty_batch=None):
  """`run`'s train step, jitted and compiled for these arguments -> (step, initial state)."""
  state = TrainState(jnp.int32(0), run.trainable, run.optimizer.init(run.trainable),
                     jax.random.key(2))
  fn = lambda frozen, st, b, c, pb: train_step(run.fns, frozen, st, b, penalty_consts=c,
                                               penalty_batch=pb)
  step = jax.jit(fn).lower(run.frozen, state, batch, consts, penalty_batch).compile(FAST_COMPILE)
  return functools.partial(step, run.frozen), state


def train(env, method, steps: int = 1, lr: float = 1e-2, penalty=None, consts=None,
          penalty_batch=None):
  """prepare (when needed) + `steps` jitted train steps of `method` on `env.batch` ->
  (prepared method, variables before, mask, [variables after each step], [metrics per step])."""
  variables = method.init_variables(jax.random.key(1), env.params)
  method = build.prepare_method(method, env.model, variables, [env.batch])
  mask, n = build.trainable_mask(method, variables, log=False)
  assert n > 0
  run = build.assemble(env.model, method, variables, mask, optax.adam(lr), penalty=penalty)
  step, state = compiled_step(run, env.batch, consts, penalty_batch)
  afters, metrics = [], []
  for _ in range(steps):
    state, m = step(state, env.batch, consts, penalty_batch)
    afters.append(mt.tuning.combine(state.trainable, run.frozen))
    metrics.append({k: float(v) for k, v in m.items()})
  return method, variables, mask, afters, metrics


def case_run(env, case: str, make):
  """`train(env, make())` of a method case; the `TUNED` case runs 2 steps once (kept in
  `env.runs`), for its method test (step 1) and the tuned model of the post-hoc tests (step 2)."""
  if case != TUNED:
    return train(env, make())
  if case not in env.runs:
    env.runs[case] = train(env, make(), steps=2)
  return env.runs[case]


def tuned(env, make) -> tuple[dict, dict]:
  """theta0 and theta_ft: the `TUNED` case (LoRA on q/v + the connector) after 2 steps, merged."""
  method, _, _, afters, _ = case_run(env, TUNED, make)
  return env.params, method.merge(afters[1])


# ----------------------------------------------------------------------------- method cases
def _get(name, **kw):
  return lambda: mt.tuning.get(name, **kw)


def method_cases(connector: tuple[str, ...], patch_kernel: str, extra_targets: str,
                 vpt_moves: tuple[str, ...]) -> dict:
  """{case: (method factory, leaves that must move in one step)} for a LLaVA-style model whose
  connector leaves are `connector`, vision patch kernel `patch_kernel`; `extra_targets` is added
  to the grad_topk / spider target patterns (e.g. "|image_newline")."""
  lora_qv = lambda: mt.tuning.get("lora", rank=2, targets=LORA_QV)
  return {
      "adapter": (_get("adapter", bottleneck=4), ()),
      "bitfit": (_get("bitfit"), ("params/projector/linear_1/bias",)),
      "dora": (_get("dora", rank=2), ()),
      "freeze": (_get("freeze"), connector + (patch_kernel,)),
      "freeze-projector": (_get("freeze", preset="projector"), connector),
      "grad_topk": (_get("grad_topk", density=0.02,
                         targets=r"llm/.*|projector/.*" + extra_targets), ()),
      "hft-projector-full": (_get("hft", seed=1, projector="full"), connector),
      "ia3": (_get("ia3"), ()),
      "llama_adapter": (_get("llama_adapter", adapter_len=2, adapter_layers=1), ()),
      "ln_tuning": (_get("ln_tuning", preset="ln_paper"), PROJECTOR),
      "lora": (lora_qv, ()),
      TUNED: (lambda: mt.tuning.compose(lora_qv(), mt.tuning.get("freeze", preset="projector")),
              connector),
      "lorasculpt": (_get("lorasculpt", rank=2, alpha=4.0, dropout=0.0, t0=1), ()),
      "model_tailor": (_get("model_tailor"), ()),  # post-hoc: trains nothing
      "parallel_adapter": (_get("parallel_adapter", bottleneck=4), ()),
      "pissa": (_get("pissa", rank=2), ()),
      "prefix_tuning": (_get("prefix_tuning", num_virtual_tokens=3, encoder_hidden_size=8), ()),
      "prompt_tuning": (_get("prompt_tuning", num_virtual_tokens=3), ()),
      "rslora": (_get("rslora", rank=2), ()),
      "spider": (_get("spider", targets=r"llm/layers_1/.*|projector/.*" + extra_targets),
                 connector),
      # rows of ids 1..16 (the batches hold some of them; gradients are checked against peft in
      # tests/tuning/selective/test_trainable_tokens.py)
      "trainable_tokens": (_get("trainable_tokens", token_indices=tuple(range(1, 17))),
                           ("adapters/llm/embed/token_rows",)),
      "vera": (_get("vera", rank=4), ()),
      "vpt": (_get("vpt", num_tokens=2), vpt_moves),
  }


def assert_cases_cover_every_method(cases: dict):
  assert {c.split("-")[0].split("+")[0] for c in cases} == set(mt.tuning.names())


def check_method_step(env, cases: dict, case: str, connector_prefixes: tuple[str, ...],
                      topk_prefixes: tuple[str, ...]):
  """One step of `case`: finite loss, masked entries bit-identical, the must-move leaves moved
  and nothing outside the mask; connector presets train the connector (`connector_prefixes`)
  and no other base leaf; grad_topk keeps its density of the `topk_prefixes` candidates, scored
  on the batch cut into its samples. Returns (before, mask)."""
  make, must_move = cases[case]
  _, before, mask, afters, metrics = case_run(env, case, make)
  after, metrics = afters[0], metrics[0]
  assert np.isfinite(metrics["loss"]) and metrics["loss"] > 0
  assert_masked_entries_fixed(before, after, mask)  # frozen entries bit-identical, some moved
  moved = changed(before, after)
  assert set(must_move) <= moved, sorted(set(must_move) - moved)
  trained = {p for p, m in pytree.flatten(mask).items() if pytree.mask_any(m)}
  assert moved <= trained
  if case in ("freeze-projector", TUNED):  # the connector and nothing else of the base
    assert {p for p in trained if p.startswith("params/")} == {
        p for p in pytree.flatten(before) if p.startswith(connector_prefixes)}
  if case == "grad_topk":
    sizes = {p: np.size(x) for p, x in pytree.flatten(before).items()}
    # a leaf kept whole is stored as a plain True: count its entries
    kept = sum(int(np.sum(m)) if np.ndim(m) else sizes[p] * bool(m)
               for p, m in pytree.flatten(mask).items())
    candidates = sum(int(np.size(x)) for p, x in pytree.flatten(before).items()
                     if p.startswith(topk_prefixes))
    assert kept == round(0.02 * candidates), (kept, candidates)
  return before, mask


def refuses_model_tailor_training(env):
  with pytest.raises(mt.tuning.MethodError, match=r"trains nothing: it is a post-hoc step.*"
                     r"export RUN --merged DIR --tailor"):
    build.trainable_mask(mt.tuning.get("model_tailor"), {"params": env.params, "adapters": {}},
                         log=False)


def check_qwen_method_step(env, cases: dict, case: str):
  """One case of a Qwen-VL family's sweep: Model Tailor trains nothing, VPT is refused (its
  prompt tokens need a CLIP / SigLIP tower's token sequence), every other method steps with
  the patch merger (`projector/`) as the connector (`check_method_step`)."""
  if case == "model_tailor":  # tailoring a tuned model is tested in each family's file
    refuses_model_tailor_training(env)
    return
  if case == "vpt":
    with pytest.raises(mt.tuning.MethodError, match="needs a vision tower.*LLaVA models only"):
      cases[case][0]().init_variables(jax.random.key(1), env.params)
    return
  check_method_step(env, cases, case, ("params/projector/",),
                    ("params/llm/", "params/projector/"))


# ----------------------------------------------------------------------------- sample split
def check_sample_split(env, crop_features: int, min_samples: int = 6):
  """Fisher / MAS (`lm_logits_fn` on one sample) and grad_topk (`sample_batches` -> `nll_loss`,
  several samples with their own images at once) see each sample as the packed batch does: same
  logits at its positions (1e-5), same summed NLL. Returns the split examples and their stack."""
  model, params, batch = env.model, env.params, env.batch
  packed = np.asarray(env.logits(params, batch))
  tok, seq = fisher.image_spec(model)
  examples = fisher.split_examples(batch, tok, seq)
  stacked = fisher.stack_examples(examples, tok, seq)
  one = jax.jit(lambda p, ex: fisher.lm_logits_fn(model)({"params": p}, ex)[0])
  together = np.asarray(env.logits(params, fisher.examples_batch(stacked, crop_features)))
  samples = answered_samples(batch)
  assert len(samples) >= min_samples and stacked["pixel_values"].shape[0] == len(samples)
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
  return examples, stacked


# ----------------------------------------------------------------------------- penalties
PENALTIES = {  # name: (options, importance kind)
    "ewc": (dict(weight=1e3), "empirical"),
    "online_ewc": (dict(weight=1e3, gamma=0.5), "empirical"),
    "mas": (dict(weight=1e3), "mas"), "l2sp": (dict(weight=10.0), None),
    "lwf": (dict(), None), "kl": (dict(weight=1.0), None),
}


def lora_qv():
  return mt.tuning.get("lora", rank=2, targets=LORA_QV)


def importance(env, kinds) -> dict:
  """{kind: (importance of the leaves LoRA on q/v changes, samples)} from `env.batch`."""
  lora = lora_qv()
  variables = lora.init_variables(jax.random.key(1), env.params)
  leaves, changed_ = penalty_setup.changed_leaves(lora, variables, env.params)
  assert sorted(changed_) == QV_KERNELS
  base = {"params": env.params, "adapters": {}}
  return {kind: fisher.fisher_from_batches(env.model, base, leaves, [env.batch], kind,
                                           num_examples=16, chunk=3)
          for kind in kinds}


def check_penalty(env, importances: dict, name: str):
  """LoRA on q/v, 2 steps with penalty `name`: loss = ce + term; LwF's term > 0.5 at theta0,
  the others 0 at theta0 then growing; a quadratic term at step 2 equals the float64 formula
  at step 1's merged weights; the base stays. Returns (LoRA method, [variables after each
  step], [terms])."""
  opts, kind = PENALTIES[name]
  imp = None
  if kind:
    imp, n = importances[kind]
    assert n == len(answered_samples(env.batch))  # every sample of the batch
    for x in imp.values():
      assert np.isfinite(np.asarray(x)).all() and float(np.sum(x)) > 0
    if name == "online_ewc":  # previous stage = this one's Fisher: F~ = gamma F + F
      imp = fisher.online_update(imp, imp, opts["gamma"])
  lora = lora_qv()
  variables = lora.init_variables(jax.random.key(1), env.params)
  penalty = penalties.get(name, **opts)
  bound, consts = penalties.bind(penalty, lora, variables, env.params, imp)
  _, _, _, afters, metrics = train(env, lora, steps=2, penalty=bound, consts=consts)
  terms = [m[f"loss_terms/{name}"] for m in metrics]
  for m, t in zip(metrics, terms):
    assert np.isfinite(m["loss"])
    np.testing.assert_allclose(m["loss"], m["ce"] + t, rtol=1e-5)
  if name == "lwf":  # at theta0: the teacher's cross-entropy with itself at T = 2
    assert terms[0] > 0.5 and terms[1] > 0.5
  else:  # 0 at theta0 (LoRA B = 0), then it grows
    assert abs(terms[0]) < 1e-6 < terms[1]
  if penalty.family == "quadratic":  # step 2 logs the term at step 1's merged weights
    w, w0 = pytree.flatten(lora.merge(afters[0])), pytree.flatten(env.params)
    want = 0.0
    for p in bound.weighted:
      f = 1.0 if imp is None else np.asarray(imp[p], np.float64)
      d = np.asarray(w[p[len("params/"):]], np.float64) - np.asarray(w0[p[len("params/"):]])
      want += penalty.coef * float(np.sum(f * d * d))
    np.testing.assert_allclose(terms[1], want, rtol=1e-4)
  assert not changed(variables["params"], afters[-1]["params"])  # LoRA: the base stays
  return lora, afters, terms


def check_gift(env, cap: dict):
  """GIFT (KD 1, ITA 0.5, AWC 1e3) with LoRA on q/v, 2 steps on caption batch `cap` as the
  penalty batch: loss = ce + its three terms; at step 1 (theta0 = theta_ref) no KD, no AWC and
  ITA = 0.5 x the model's caption NLL on `cap`; both grow at step 2; the base stays."""
  lora = lora_qv()
  variables = lora.init_variables(jax.random.key(1), env.params)
  penalty = penalties.get("gift", weight=1e3, kd_weight=1.0, ita_weight=0.5)
  bound, consts = penalties.bind(penalty, lora, variables, env.params, model=env.model)
  _, _, _, afters, metrics = train(env, lora, steps=2, penalty=bound, consts=consts,
                                   penalty_batch=cap)
  first, second = metrics
  for m in metrics:
    terms = sum(m[f"loss_terms/gift_{k}"] for k in ("kd", "ita", "awc"))
    assert np.isfinite(m["loss"]) and np.isclose(m["loss"], m["ce"] + terms, rtol=1e-5)
  ita = gift.caption_nll(env.logits(env.params, cap), cap["input_ids"], cap["loss_mask"])
  np.testing.assert_allclose(first["loss_terms/gift_ita"], 0.5 * float(ita), rtol=1e-4)
  assert first["loss_terms/gift_awc"] == 0.0 and abs(first["loss_terms/gift_kd"]) < 1e-5
  assert second["loss_terms/gift_awc"] > 0 and second["loss_terms/gift_kd"] > 0
  assert not changed(variables["params"], afters[-1]["params"])


# ----------------------------------------------------------------------------- post-hoc
def check_merges(env, theta0: dict, theta_ft: dict) -> dict:
  """WiSE-FT / DARE / TIES of a tuned model: finite logits on the batch, apart from both ends;
  WiSE-FT at 1 and 0 gives the ends' logits exactly. Returns the merged params."""
  real = np.asarray(env.batch["attention_mask"]).astype(bool)
  logits = lambda p: np.asarray(env.logits(p, env.batch))[real]
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
  return merged


def check_model_tailor(env, theta0: dict, theta_ft: dict) -> dict:
  """Model Tailor on the batch as calibration data: the q/v kernels patched (neither end), the
  projector reset to theta0 (as the released code), finite logits that differ from theta_ft's.
  Returns the flat tailored params."""
  out = mt.tuning.get("model_tailor").tailor(env.model, theta0, theta_ft, [env.batch])
  flat0, flat_ft, flat = (pytree.flatten(t) for t in (theta0, theta_ft, out))
  for p in ("llm/layers/attn/q_proj/kernel", "llm/layers/attn/v_proj/kernel"):
    assert not np.array_equal(flat[p], flat_ft[p]) and not np.array_equal(flat[p], flat0[p])
  for p in flat:
    if p.startswith("projector/"):
      np.testing.assert_array_equal(flat[p], flat0[p])
  z = np.asarray(env.logits(out, env.batch))
  assert np.isfinite(z).all() and np.abs(z - np.asarray(env.logits(theta_ft, env.batch))).max() > 0
  return flat
