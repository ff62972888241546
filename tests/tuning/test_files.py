"""Our adapter file for every method: save -> load on the original base -> same logits."""
from __future__ import annotations

import jax
import numpy as np
import pytest

import mllm_tune as mt
from mllm_tune.tuning.files import load_adapters, save_adapters
from mllm_tune.checkpoints.safetensors_io import CheckpointError
from mllm_tune.models import build_model, init_params
from mllm_tune.models.config import LLMConfig, LlavaConfig, VisionConfig
from tests.helpers.peft_ref import randomize

CFG = LlavaConfig(
    vision=VisionConfig(hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2,
                        image_size=28, patch_size=14),
    llm=LLMConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=8), image_token_id=63)

METHODS = {
    "lorasculpt": dict(rank=2, alpha=4.0),
    "pissa": dict(rank=2, alpha=2.0, targets=r"llm/layers_\d+/attn/(q|v)_proj"),
    "parallel_adapter": dict(bottleneck=4),
    "hft": dict(seed=3),
    "vpt": dict(num_tokens=2, deep=True),
    "bitfit": dict(add_missing_bias=True),
}


@pytest.fixture(scope="module")
def base():
  model = build_model(CFG)
  return model, init_params(model, jax.random.key(0))


def _logits(model, variables):
  ids = np.array([[1, 63, 63, 63, 63, 5, 6, 7]])
  px = np.random.RandomState(0).randn(1, 28, 28, 3).astype(np.float32)
  return np.asarray(model.apply(variables, ids, pixel_values=px))


@pytest.mark.parametrize("name", sorted(METHODS))
def test_save_load_on_the_original_base_reproduces_the_tuned_model(name, base, tmp_path):
  model, params = base
  method = mt.tuning.get(name, **METHODS[name])
  v = method.init_variables(jax.random.key(1), params)
  mask = method.trainable(v)
  train, frozen = mt.tuning.partition(v, mask)
  train = randomize(train, tuple({k.split("/")[-1] for k in mt.pytree.flatten(train)}),
                    seed=1, scale=0.05)  # "training": move every trained leaf
  tuned = mt.tuning.combine(train, frozen)
  save_adapters(str(tmp_path / name), method, tuned, mask)
  method2, v2 = load_adapters(str(tmp_path / name), params)
  assert method2 == method
  np.testing.assert_allclose(_logits(model, v2), _logits(model, tuned), atol=1e-5)
  assert np.abs(_logits(model, tuned) - _logits(model, {"params": params})).max() > 1e-4


def test_loading_on_a_different_base_is_a_clear_error(base, tmp_path):
  model, params = base
  method = mt.tuning.get("parallel_adapter", bottleneck=4)
  save_adapters(str(tmp_path / "a"), method, method.init_variables(jax.random.key(0), params))
  import dataclasses
  other = build_model(dataclasses.replace(CFG, llm=dataclasses.replace(CFG.llm,
                                                                       hidden_size=48)))
  with pytest.raises(CheckpointError, match=r"adapter leaf 'llm/layers/mlp/parallel_down' has "
                                            r"shape \(2, 32, 4\) but method 'parallel_adapter'"):
    load_adapters(str(tmp_path / "a"), init_params(other, jax.random.key(0)))
