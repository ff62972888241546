"""Model internals: adapter hooks in Linear, scanned layout, KV cache, remat, image merging."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mllm_tune.models import build_model, init_kv_cache, init_params
from mllm_tune.models.config import CausalLMConfig, LLMConfig, LlavaConfig, VisionConfig
from mllm_tune.models.layers import Linear
from mllm_tune.models.llava import merge_image_features

LLM = LLMConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=3, num_heads=4,
                num_kv_heads=2, head_dim=8, max_position_embeddings=128)


def test_linear_applies_lora_and_ia3_adapters_like_the_formula():
  rng = np.random.RandomState(0)
  x = rng.randn(2, 5, 6).astype(np.float32)
  k, b = rng.randn(6, 4).astype(np.float32), rng.randn(4).astype(np.float32)
  a_, b_ = rng.randn(6, 2).astype(np.float32), rng.randn(2, 4).astype(np.float32)
  s_in, s_out = rng.rand(6).astype(np.float32), rng.rand(4).astype(np.float32)
  lin = Linear(4, use_bias=True)
  params = {"kernel": k, "bias": b}
  plain = lin.apply({"params": params}, x)
  np.testing.assert_allclose(plain, x @ k + b, rtol=1e-5, atol=1e-6)
  adapters = {"lora_a": a_, "lora_b": b_, "lora_scale": np.float32(0.5),
              "ia3_in": s_in, "ia3_out": s_out}
  y = lin.apply({"params": params, "adapters": adapters}, x)
  x64 = x.astype(np.float64) * s_in
  ref = (x64 @ k + b + 0.5 * (x64 @ a_) @ b_) * s_out
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


def test_layers_are_stacked_on_a_leading_axis_and_adapters_reach_every_layer():
  model = build_model(CausalLMConfig(llm=LLM))
  params = init_params(model, jax.random.key(0))
  q = params["llm"]["layers"]["attn"]["q_proj"]["kernel"]
  assert q.shape == (3, 32, 32)
  assert params["llm"]["layers"]["attn"]["k_proj"]["kernel"].shape == (3, 32, 16)
  assert not np.allclose(q[0], q[1])  # independent init per layer
  ids = jnp.asarray(np.random.RandomState(0).randint(0, 64, (2, 7)))
  base = model.apply({"params": params}, ids)
  # a LoRA delta on layer 1 only (zeros elsewhere) changes the output; zero B keeps it equal
  a = jnp.ones((3, 32, 2)) * 0.1
  b = jnp.zeros((3, 2, 16))  # v_proj: 2 kv heads x 8
  ad = {"llm": {"layers": {"attn": {"v_proj": {"lora_a": a, "lora_b": b,
                                               "lora_scale": jnp.ones((3,))}}}}}
  same = model.apply({"params": params, "adapters": ad}, ids)
  np.testing.assert_allclose(same, base, atol=1e-6)
  ad["llm"]["layers"]["attn"]["v_proj"]["lora_b"] = b.at[1].set(0.5)
  changed = model.apply({"params": params, "adapters": ad}, ids)
  assert np.abs(np.asarray(changed - base)).max() > 1e-3


def test_kv_cache_decoding_equals_full_forward():
  model = build_model(CausalLMConfig(llm=LLM))
  params = init_params(model, jax.random.key(1))
  rng = np.random.RandomState(0)
  ids = jnp.asarray(rng.randint(3, 64, (2, 10)))
  mask = jnp.asarray(np.array([[1] * 10, [0, 0, 0] + [1] * 7]))
  full = model.apply({"params": params}, ids, mask)
  pos = jnp.maximum(jnp.cumsum(mask, -1) - 1, 0)
  cache = init_kv_cache(LLM, 2, 12)
  cmask = jnp.concatenate([mask, jnp.ones((2, 2), mask.dtype)], 1)
  logits_p, cache = model.apply({"params": params}, ids[:, :6], cmask, pos[:, :6],
                                kv_cache=cache, cache_index=0)
  steps = [logits_p]
  for t in range(6, 10):
    lg, cache = model.apply({"params": params}, ids[:, t:t + 1], cmask, pos[:, t:t + 1],
                            kv_cache=cache, cache_index=t)
    steps.append(lg)
  inc = jnp.concatenate(steps, axis=1)
  real = np.asarray(mask).astype(bool)
  np.testing.assert_allclose(np.asarray(inc)[real], np.asarray(full)[real], atol=1e-5)


@pytest.mark.parametrize("scan_unroll", [1, 3])
def test_unstacked_layers_and_per_layer_cache_equal_the_scanned_stack(scan_unroll):
  """`unstack_layers` (the decoding form: llm/layers_i, one cache buffer per layer) computes
  the same logits and cache contents as the scanned stack, adapters included."""
  import dataclasses
  from mllm_tune.models.kv_cache import unstack_layers
  cfg = dataclasses.replace(LLM, scan_unroll=scan_unroll)
  model = build_model(CausalLMConfig(llm=cfg))
  params = init_params(model, jax.random.key(2))
  rng = np.random.RandomState(1)
  ad = {"llm": {"layers": {"mlp": {"up_proj": {
      "lora_a": jnp.asarray(rng.randn(3, 32, 2), jnp.float32),
      "lora_b": jnp.asarray(rng.randn(3, 2, 48), jnp.float32),
      "lora_scale": jnp.ones((3,))}}}}}
  variables = {"params": params, "adapters": ad}
  umodel, uvars = unstack_layers(model, variables)
  assert "layers" not in uvars["params"]["llm"] and "layers_2" in uvars["adapters"]["llm"]
  np.testing.assert_array_equal(uvars["params"]["llm"]["layers_1"]["attn"]["q_proj"]["kernel"],
                                params["llm"]["layers"]["attn"]["q_proj"]["kernel"][1])
  ids = jnp.asarray(rng.randint(3, 64, (2, 6)))
  mask = jnp.ones((2, 8), jnp.int32)
  pos = jnp.broadcast_to(jnp.arange(6), (2, 6))
  want, cache = model.apply(variables, ids, mask, pos, kv_cache=init_kv_cache(cfg, 2, 8))
  ucache0 = init_kv_cache(umodel.config.llm, 2, 8)
  assert isinstance(ucache0.k_LBKSH, tuple) and ucache0.k_LBKSH[0].shape == (2, 2, 8, 8)
  got, ucache = umodel.apply(uvars, ids, mask, pos, kv_cache=ucache0)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert np.abs(np.asarray(want - model.apply({"params": params}, ids))).max() > 1e-3
  last, _ = umodel.apply(uvars, ids, mask, pos, kv_cache=ucache0, last_logits_only=True)
  assert last.shape == (2, 1, 64)
  np.testing.assert_allclose(last, want[:, -1:], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.stack(ucache.k_LBKSH), cache.k_LBKSH, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.stack(ucache.v_LBKSH), cache.v_LBKSH, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("policy", ["full", "dots_saveable"])
def test_remat_changes_nothing_numerically(policy):
  import dataclasses
  ids = jnp.asarray(np.random.RandomState(0).randint(0, 64, (2, 6)))
  m0 = build_model(CausalLMConfig(llm=LLM))
  m1 = build_model(CausalLMConfig(llm=dataclasses.replace(LLM, remat_policy=policy)))
  params = init_params(m0, jax.random.key(0))
  loss = lambda m: jax.value_and_grad(lambda p: m.apply({"params": p}, ids).mean())(params)
  (l0, g0), (l1, g1) = loss(m0), loss(m1)
  np.testing.assert_allclose(l0, l1, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("window", [None, 1])
def test_token_valid_reads_the_real_query_tokens_off_the_attention_mask(window):
  """What a capacity-limited MoE layer routes: the query tokens whose own slot is a real token,
  with left and right padding, packed segments (0 = padding) and queries written at a cache
  offset (decoding)."""
  from mllm_tune.models.llm import causal_mask, token_valid
  keys_BS = np.array([[0, 0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0, 0]], np.int32)
  seg_BT = np.array([[0, 0, 1, 1, 2, 2, 2, 2], [1, 1, 2, 2, 2, 0, 0, 0]], np.int32)
  for offset, t in ((0, 8), (3, 4), (7, 1)):
    slots = offset + np.broadcast_to(np.arange(t), (2, t))
    mask = causal_mask(jnp.asarray(slots), jnp.asarray(keys_BS), window,
                       None if t != 8 else jnp.asarray(seg_BT))
    got = np.asarray(jax.jit(token_valid)(mask, offset))
    np.testing.assert_array_equal(got, keys_BS[:, offset:offset + t] == 1, err_msg=str(offset))


def test_merge_image_features_fills_image_slots_in_row_major_order():
  emb = jnp.zeros((2, 4, 1))
  is_img = jnp.asarray([[False, True, True, False], [True, False, False, True]])
  feats = jnp.arange(1, 5, dtype=jnp.float32)[:, None]
  out = np.asarray(merge_image_features(emb, is_img, feats))[..., 0]
  np.testing.assert_array_equal(out, [[0, 1, 2, 0], [3, 0, 0, 4]])


def test_linear_projector_and_bf16_compute_run():
  cfg = LlavaConfig(
      vision=VisionConfig(hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2,
                          image_size=28, patch_size=14, dtype="bfloat16"),
      llm=LLMConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                    num_heads=4, num_kv_heads=2, head_dim=8, dtype="bfloat16"),
      projector_type="linear", image_token_id=63)
  model = build_model(cfg)
  params = init_params(model, jax.random.key(0))
  assert set(params["projector"]) == {"linear_1"}
  assert params["llm"]["embed"]["embedding"].dtype == jnp.float32  # master weights stay fp32
  ids = jnp.asarray([[1, 63, 63, 63, 63, 5]])
  out = model.apply({"params": params}, ids, pixel_values=jnp.ones((1, 28, 28, 3)))
  assert out.dtype == jnp.float32 and out.shape == (1, 6, 64)
  assert np.isfinite(np.asarray(out)).all()


def test_image_token_mismatch_under_jit_poisons_output_with_nan():
  cfg = LlavaConfig(
      vision=VisionConfig(hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                          image_size=28, patch_size=14),
      llm=LLMConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=1,
                    num_heads=4, num_kv_heads=2, head_dim=8), image_token_id=63)
  model = build_model(cfg)
  params = init_params(model, jax.random.key(0))
  fwd = jax.jit(lambda i, x: model.apply({"params": params}, i, pixel_values=x))
  px = jnp.ones((1, 28, 28, 3))
  ok = fwd(jnp.asarray([[1, 63, 63, 63, 63, 5]]), px)
  bad = fwd(jnp.asarray([[1, 63, 63, 63, 5, 5]]), px)  # 3 image tokens for a 4-token image
  assert np.isfinite(np.asarray(ok)).all()
  assert np.isnan(np.asarray(bad)).all()
  with pytest.raises(ValueError, match="3 image tokens"):
    model.apply({"params": params}, jnp.asarray([[1, 63, 63, 63, 5, 5]]), pixel_values=px)
