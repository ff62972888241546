"""Invariants every selective method keeps (docs/methods.md §1.2, 2.x): masked entries never move
over 20 AdamW steps with weight decay, frozen leaves hold no optimizer state, trainable counts match
docs/methods.md §9, merge -> save_pretrained loads in transformers with the same logits.

The shared tiny-model helpers live in `tests/helpers/tiny_models.py`.
"""
from __future__ import annotations

import jax
import numpy as np
import optax
import pytest

import mllm_tune as mt
import mllm_tune.tuning.selective.hft  # noqa: F401  (registers hft)
import mllm_tune.tuning.selective.grad_topk  # noqa: F401  (registers grad_topk)
import mllm_tune.tuning.selective.model_tailor  # noqa: F401  (registers model_tailor)
import mllm_tune.tuning.selective.by_path  # noqa: F401  (registers freeze, bitfit, ln_tuning)
import mllm_tune.tuning.selective.spider  # noqa: F401  (registers spider)
from mllm_tune import pytree as select
from tests.helpers.tiny_models import (SYNTHETIC_BATCH, assert_masked_entries_fixed, logits_fn,
                                       state_paths, synthetic_loss, tiny_llava, train)

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
  with pytest.raises(mt.tuning.MethodError, match=r"k=5 \(config key 'method.k'\) must be "
                     r"in \[1, 3\]"):
    mt.tuning.get("freeze", preset="llm_last_k", k=5).trainable(variables)
  with pytest.raises(mt.tuning.MethodError, match="either preset"):
    mt.tuning.get("freeze", preset="llm", targets="projector/.*")
  with pytest.raises(mt.tuning.MethodError, match="no mask yet"):
    mt.tuning.get("grad_topk").trainable(variables)


# ----------------------------------------------------------------------------- merge -> HF
@pytest.fixture(scope="module")
def hf_base(tmp_path_factory):
  from tests.helpers import hf_tiny
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

  from tests.helpers import hf_tiny
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
