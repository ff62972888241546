"""Invariants every selective method keeps (docs/methods.md §1.2, 2.x): masked entries never move
over 20 AdamW steps with weight decay, frozen leaves hold no optimizer state, trainable counts match
docs/methods.md §9, merge -> save_pretrained loads in transformers with the same logits.

Also the shared tiny-model helpers of the `test_selective_*` modules.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mllm_tune as mt
import mllm_tune.tuning.selective.hft  # noqa: F401  (registers hft)
import mllm_tune.tuning.selective.grad_topk  # noqa: F401  (registers grad_topk)
import mllm_tune.tuning.selective.model_tailor  # noqa: F401  (registers model_tailor)
import mllm_tune.tuning.selective.by_path  # noqa: F401  (registers freeze, bitfit, ln_tuning)
import mllm_tune.tuning.selective.spider  # noqa: F401  (registers spider)
from mllm_tune.models import (CausalLMConfig, LlavaConfig, LLMConfig, VisionConfig, build_model,
                              param_shapes)
from mllm_tune import pytree as select

IMAGE_TOKEN = 63


def random_params(model, seed: int = 0, scale: float = 0.1) -> dict:
  """Random params from the shapes alone (`jax.eval_shape`; a real Flax init compiles slowly on
  CPU): norm scales ~ 1 + N(0, scale^2), everything else ~ N(0, scale^2)."""
  rng = np.random.RandomState(seed)
  flat = {}
  for p, s in select.flatten(param_shapes(model)).items():
    x = rng.randn(*s.shape).astype(np.float32) * scale
    flat[p] = jnp.asarray(x + 1.0 if p.endswith("norm/scale") or "/norm" in p and
                          p.endswith("/scale") else x)
  return select.unflatten(flat)


@functools.cache
def tiny_lm():
  """A tiny bare Llama (text only) and one batch: the cheapest model to differentiate."""
  model = build_model(CausalLMConfig(llm=LLMConfig(
      vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
      num_kv_heads=2, head_dim=8)))
  ids = np.random.RandomState(0).randint(1, 60, size=(2, 10)).astype(np.int32)
  return model, random_params(model), {"input_ids": ids, "attention_mask": np.ones_like(ids)}


@functools.cache
def tiny_llava(model_type: str = "llama", square: bool = False):
  """Our own tiny CLIP + decoder LLaVA (random init) and one multimodal batch (cached: do not
  mutate the returned dicts). `square`: every LLM Linear is 32 x 32 (one compile per shape)."""
  llm = LLMConfig(model_type=model_type, vocab_size=64, hidden_size=32,
                  intermediate_size=32 if square else 48, num_layers=3, num_heads=4,
                  num_kv_heads=4 if square else 2, head_dim=8, qkv_bias=model_type == "qwen2")
  vision = VisionConfig(hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2,
                        image_size=28, patch_size=14)
  model = build_model(LlavaConfig(vision=vision, llm=llm, image_token_id=IMAGE_TOKEN))
  params = random_params(model)
  rng = np.random.RandomState(0)
  per = model.config.image_seq_len
  ids = rng.randint(1, 60, size=(2, 12)).astype(np.int32)
  ids[:, 1:1 + per] = IMAGE_TOKEN  # one image per sample: per-sample gradients slice all arrays
  batch = {"input_ids": ids, "attention_mask": np.ones_like(ids),
           "pixel_values": rng.randn(2, 28, 28, 3).astype(np.float32)}
  return model, params, batch


def logits_fn(model):
  """Jitted `(variables, batch) -> logits` (eager Flax applies are slow on CPU)."""
  return jax.jit(lambda v, b: model.apply(v, b["input_ids"], b["attention_mask"],
                                          pixel_values=b.get("pixel_values")))


def next_token_loss(model):
  def loss(variables, batch):
    logits = model.apply(variables, batch["input_ids"], batch["attention_mask"],
                         pixel_values=batch.get("pixel_values"))
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    nll = -jnp.take_along_axis(logp, batch["input_ids"][:, 1:, None], axis=-1)[..., 0]
    w = batch["attention_mask"][:, 1:].astype(jnp.float32)
    return (nll * w).sum() / w.sum()
  return loss


def synthetic_loss(variables, batch):
  """A cheap smooth loss touching every entry of every leaf (params and adapters), different
  per sample (`batch["scale"]` (B,)): the masking invariants do not depend on the model."""
  total = 0.0
  for i, x in enumerate(jax.tree.leaves(variables)):
    x = x.astype(jnp.float32)
    total = total + jnp.sum(jnp.sin(x[None] * (1.0 + batch["scale"].reshape(
        (-1,) + (1,) * x.ndim)) + i))
  return total / batch["scale"].shape[0]


SYNTHETIC_BATCH = {"scale": np.asarray([0.5, 2.0], np.float32)}


def train(method, variables, loss_fn, batch, optimizer, steps: int):
  """`steps` jitted steps w.r.t. the trainable partition -> (variables, opt_state, trained)."""
  mask = method.trainable(variables)
  trained, frozen = mt.tuning.partition(variables, mask)
  opt = mt.tuning.build_optimizer(method, variables, mask, trained, optimizer)
  state = opt.init(trained)

  @jax.jit
  def step(tr, st):
    grads = jax.grad(lambda t: loss_fn(mt.tuning.combine(t, frozen), batch))(tr)
    updates, st = opt.update(grads, st, tr)
    return optax.apply_updates(tr, updates), st

  for _ in range(steps):
    trained, state = step(trained, state)
  return mt.tuning.combine(trained, frozen), state, trained


def state_paths(opt_state) -> set[str]:
  """Every dict-key path inside an optimizer state, '/'-joined (NamedTuple fields dropped)."""
  out = set()
  for path, _ in jax.tree_util.tree_flatten_with_path(opt_state)[0]:
    keys = [str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)]
    out.add("/".join(keys))
  return out


def element_mask(mask_leaf, shape) -> np.ndarray:
  return np.broadcast_to(np.asarray(mask_leaf, bool), shape)


def assert_masked_entries_fixed(before: dict, after: dict, mask: dict):
  """Entries outside the mask are bit-identical; trained entries moved somewhere."""
  flat_b, flat_a, flat_m = (select.flatten(t) for t in (before, after, mask))
  moved = 0
  for p, x0 in flat_b.items():
    x0, x1 = np.asarray(x0), np.asarray(flat_a[p])
    m = element_mask(flat_m[p], x0.shape)
    np.testing.assert_array_equal(x1[~m], x0[~m], err_msg=p)
    moved += int((x1[m] != x0[m]).sum())
  assert moved > 0


# ----------------------------------------------------------------------------- tests
def _grad_topk(model, params, batch):
  del model, batch
  return mt.tuning.get("grad_topk", density=0.05).prepare(
      synthetic_loss, {"params": params, "adapters": {}}, [SYNTHETIC_BATCH])


METHOD_CASES = {
    "freeze_llm_last_k": lambda m, p, b: mt.tuning.get("freeze", preset="llm_last_k", k=1),
    "bitfit": lambda m, p, b: mt.tuning.get("bitfit", add_missing_bias=True),
    "ln_tuning": lambda m, p, b: mt.tuning.get("ln_tuning", preset="ln_paper"),
    "hft": lambda m, p, b: mt.tuning.get("hft", seed=3),
    "spider": lambda m, p, b: mt.tuning.get("spider", k=2),
    "grad_topk": _grad_topk,
}


@pytest.mark.parametrize("case", sorted(METHOD_CASES))
def test_masked_entries_never_move_and_frozen_leaves_hold_no_state(case):
  model, params, batch = tiny_llava()
  method = METHOD_CASES[case](model, params, batch)
  variables = method.init_variables(jax.random.key(1), params)
  mask = method.trainable(variables)
  after, opt_state, trained = train(method, variables, synthetic_loss, SYNTHETIC_BATCH,
                                    optax.adamw(1e-2, weight_decay=0.1), 20)
  assert_masked_entries_fixed(variables, after, mask)
  frozen_paths = {p for p, m in select.flatten(mask).items() if not select.mask_any(m)}
  in_state = state_paths(opt_state)
  assert frozen_paths and not any(p in in_state for p in frozen_paths)
  assert set(select.flatten(trained)) <= in_state  # ... while trained leaves do hold state


def test_trainable_counts_match_methods_summary():
  model, params, _ = tiny_llava()
  c = model.config
  d, n_layers, f = c.llm.hidden_size, c.llm.num_layers, c.llm.intermediate_size
  count = lambda m, v: mt.tuning.trainable_table(v, m.trainable(v))[1]
  variables = {"params": params, "adapters": {}}
  total = sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(params))
  assert count(mt.tuning.get("freeze"), variables) == total  # full fine-tuning
  proj = sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(params["projector"]))
  assert count(mt.tuning.get("freeze", preset="projector"), variables) == proj
  block = sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(params["llm"]["layers"]))
  assert count(mt.tuning.get("freeze", preset="llm_last_k", k=1), variables) == block // n_layers
  assert count(mt.tuning.get("freeze", preset="llm"), variables) == block + proj
  attn = 2 * d * d + 2 * d * (c.llm.num_kv_heads * c.llm.head_dim)
  assert count(mt.tuning.get("freeze", preset="attn_only"), variables) == n_layers * attn
  assert count(mt.tuning.get("ln_tuning"), variables) == (2 * n_layers + 1) * d
  # BitFit on a Llama LLaVA with added LLM biases: sum of d_out over every bias
  bitfit = mt.tuning.get("bitfit", add_missing_bias=True)
  bv = bitfit.init_variables(jax.random.key(0), params)
  biases = sum(int(np.prod(np.shape(x))) for p, x in select.flatten(params).items()
               if p.endswith("/bias"))
  llm_d_out = d + 2 * c.llm.num_kv_heads * c.llm.head_dim + d + 2 * f + d  # q k v o gate up down
  assert count(bitfit, bv) == biases + n_layers * llm_d_out
  # Model Tailor is post-hoc: it trains nothing
  assert count(mt.tuning.get("model_tailor"), variables) == 0
  # in-place methods merge to their params as they are
  for name in ("freeze", "ln_tuning", "hft", "spider", "model_tailor"):
    assert mt.tuning.get(name).merge(variables) is params


def test_compositions_are_disjoint_or_refused():
  model, params, _ = tiny_llava()
  variables = {"params": params, "adapters": {}}
  ok = mt.tuning.compose(mt.tuning.get("ln_tuning"), mt.tuning.get("freeze", preset="projector"))
  n = mt.tuning.trainable_table(variables, ok.trainable(variables))[1]
  proj = sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(params["projector"]))
  assert n == (2 * 3 + 1) * 32 + proj
  bad = mt.tuning.compose(mt.tuning.get("freeze", preset="llm"), mt.tuning.get("ln_tuning"))
  with pytest.raises(mt.tuning.MethodError, match="input_norm/scale.*more than one method"):
    bad.trainable(variables)


def test_regex_matching_nothing_names_it_and_nearby_paths():
  _, params, _ = tiny_llava()
  variables = {"params": params, "adapters": {}}
  with pytest.raises(select.SelectorError, match=r"qproj/kernel' matches no .*"
                                                 r"nearby paths.*q_proj/kernel"):
    mt.tuning.get("freeze", targets=r"llm/layers_\d+/attn/qproj/kernel").trainable(variables)
  with pytest.raises(mt.tuning.MethodError, match="k=5 must be in \\[1, 3\\]"):
    mt.tuning.get("freeze", preset="llm_last_k", k=5).trainable(variables)
  with pytest.raises(mt.tuning.MethodError, match="either preset"):
    mt.tuning.get("freeze", preset="llm", targets="projector/.*")
  with pytest.raises(mt.tuning.MethodError, match="no mask yet"):
    mt.tuning.get("grad_topk").trainable(variables)


# ----------------------------------------------------------------------------- merge -> HF
@pytest.fixture(scope="module")
def hf_base(tmp_path_factory):
  from tests import hf_tiny
  d = str(tmp_path_factory.mktemp("hf") / "base")
  hf_tiny.clip_llama().save_pretrained(d)
  model, params = mt.load_pretrained(d)
  per = model.config.image_seq_len
  ids, mask = hf_tiny.padded_batch([[1, 5] + hf_tiny.image_tokens(per, 1) + [7, 8, 9],
                                    [1, 20, 21, 22]], "right")
  px = np.random.RandomState(0).randn(1, 28, 28, 3).astype(np.float32)
  return model, params, (ids, mask, px)


def _tuned(name, model, params):
  """(model, merged params, unmerged variables) after 2 synthetic SGD steps of `name`.

  Every selective method but BitFit-with-added-biases trains base leaves in place (merge is the
  identity), so one composition of in-place methods stands for them."""
  from mllm_tune.tuning.selective import by_path as selective
  method = {"in_place": lambda: mt.tuning.compose(
                mt.tuning.get("hft", seed=1, projector="frozen"),
                mt.tuning.get("ln_tuning", preset="ln_paper")),
            "bitfit": lambda: mt.tuning.get("bitfit", add_missing_bias=True)}[name]()
  variables = method.init_variables(jax.random.key(0), params)
  variables, _, _ = train(method, variables, synthetic_loss, SYNTHETIC_BATCH, optax.sgd(0.05), 2)
  if name == "bitfit":
    merged_model, merged = selective.merge_with_model(model, variables)
    return merged_model, merged, variables
  return model, method.merge(variables), variables


@pytest.mark.parametrize("name", ["bitfit", "in_place"])
def test_merge_then_save_pretrained_loads_in_transformers_with_same_logits(name, hf_base,
                                                                            tmp_path):
  from transformers import LlavaForConditionalGeneration

  from tests import hf_tiny
  model, params, (ids, mask, px) = hf_base
  merged_model, merged, variables = _tuned(name, model, params)
  logits = logits_fn(model)
  batch = {"input_ids": ids, "attention_mask": mask, "pixel_values": px}
  ours = np.asarray(logits(variables, batch))
  base = np.asarray(logits({"params": params, "adapters": {}}, batch))
  assert np.abs(ours - base).max() > 1e-3  # tuning changed the model
  mt.save_pretrained(str(tmp_path / "merged"), merged_model, merged)
  hf = LlavaForConditionalGeneration.from_pretrained(str(tmp_path / "merged")).eval()
  ref = hf_tiny.hf_logits(hf, ids, mask, px)
  real = mask.astype(bool)
  np.testing.assert_allclose(ours[real], ref[real], atol=1e-4)


@pytest.mark.parametrize("name", ["bitfit", "freeze", "grad_topk", "hft", "ln_tuning",
                                  "model_tailor", "spider"])
def test_method_configs_build_their_method(name):
  import importlib
  cfg = importlib.import_module(f"configs.methods.{name}").get_config()
  method = mt.tuning.from_config(cfg)
  assert method.name == name == cfg.name
  for key, value in cfg.to_dict().items():
    if key != "name":
      assert getattr(method, key) == value, key
