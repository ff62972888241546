"""BitFit (docs/methods.md §2.2): only biases move, added zero biases keep step-0 logits, the
`extra_bias` step equals a float64 NumPy replica, merge adds biases only where a HF config can
hold them."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mllm_tune as mt
from mllm_tune.models.layers import Linear
from mllm_tune import pytree as select
from mllm_tune.tuning.selective.by_path import merge_with_model
from tests.helpers.tiny_models import (logits_fn, next_token_loss, tiny_llava, tiny_lm,
                                       train)


def _logits(model, variables, batch):
  return np.asarray(logits_fn(model)(variables, batch))


def test_only_biases_move_and_added_zero_biases_keep_step0_logits():
  model, params, batch = tiny_lm()  # a bias-free Llama: BitFit needs the added biases
  method = mt.tuning.get("bitfit", add_missing_bias=True)
  variables = method.init_variables(jax.random.key(0), params)
  added = select.flatten(variables["adapters"])
  assert sorted(p.split("/")[-2] for p in added) == sorted(
      ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
  logits = logits_fn(model)
  np.testing.assert_array_equal(np.asarray(logits(variables, batch)),
                                np.asarray(logits({"params": params, "adapters": {}}, batch)))
  after, _, trained = train(method, variables, next_token_loss(model), batch, optax.sgd(0.5), 2)
  assert "params" not in trained  # the base weights are not even differentiated
  before_flat, after_flat = select.flatten(variables), select.flatten(after)
  for p, x in before_flat.items():
    same = np.array_equal(np.asarray(x), np.asarray(after_flat[p]))
    assert same != p.endswith("/extra_bias"), p  # every added bias moved, nothing else did


def test_extra_bias_sgd_step_matches_numpy_float64():
  rng = np.random.RandomState(0)
  x_BTI = rng.randn(2, 5, 6).astype(np.float32)
  k_IO = rng.randn(6, 4).astype(np.float32)
  b_O = rng.randn(4).astype(np.float32) * 0.1
  t_BTO = rng.randn(2, 5, 4).astype(np.float32)
  lin = Linear(4)

  def loss(extra):
    y = lin.apply({"params": {"kernel": k_IO}, "adapters": {"extra_bias": extra}}, x_BTI)
    return 0.5 * jnp.sum((y - t_BTO) ** 2)

  new = b_O - 0.1 * jax.grad(loss)(jnp.asarray(b_O))
  y64 = x_BTI.astype(np.float64) @ k_IO.astype(np.float64) + b_O
  ref = b_O - 0.1 * (y64 - t_BTO).sum(axis=(0, 1))
  np.testing.assert_allclose(np.asarray(new), ref, rtol=1e-5, atol=1e-6)


def test_merge_with_model_fills_llama_siblings_and_keeps_logits():
  model, params, batch = tiny_llava()
  method = mt.tuning.get("bitfit", add_missing_bias=True,
                         missing_bias_targets=r"llm/layers_\d+/attn/q_proj")
  variables = method.init_variables(jax.random.key(0), params)
  variables["adapters"]["llm"]["layers"]["attn"]["q_proj"]["extra_bias"] = jnp.asarray(
      np.random.RandomState(0).randn(3, 32).astype(np.float32))
  with pytest.raises(mt.tuning.MethodError, match="merge_with_model"):
    method.merge(variables)
  merged_model, merged = merge_with_model(model, variables)
  llm = merged_model.config.llm
  assert llm.qkv_bias and llm.o_bias and not llm.mlp_bias  # Llama attention_bias covers q/k/v/o
  attn = merged["llm"]["layers"]["attn"]
  assert np.all(np.asarray(attn["k_proj"]["bias"]) == 0) and "bias" not in merged["llm"][
      "layers"]["mlp"]["up_proj"]
  np.testing.assert_allclose(_logits(merged_model, {"params": merged}, batch),
                             _logits(model, variables, batch), atol=1e-5)


@pytest.mark.parametrize("model_type,missing", [("qwen2", "o_proj"), ("mistral", "q/k/v_proj")])
def test_merge_refused_where_the_hf_config_cannot_hold_the_biases(model_type, missing):
  model, params, _ = tiny_llava(model_type)
  method = mt.tuning.get("bitfit", add_missing_bias=True)
  variables = method.init_variables(jax.random.key(0), params)
  with pytest.raises(mt.tuning.MethodError, match=f"{model_type} config.json cannot hold.*"
                                                  f"{missing.replace('/', '.')}"):
    merge_with_model(model, variables)


def test_bias_regex_on_a_bias_free_model_names_the_regex():
  _, params, _ = tiny_llava()
  llm_only = {"params": {"llm": params["llm"]}, "adapters": {}}
  with pytest.raises(select.SelectorError, match=r"'\.\*/bias' matches no"):
    mt.tuning.get("bitfit").trainable(llm_only)
