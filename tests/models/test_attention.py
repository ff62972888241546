"""`attention` (every implementation that runs on CPU: our custom-VJP "lse" and
jax.nn.dot_product_attention's "xla") against float64 NumPy formulas for the output and for
the gradients (the textbook softmax backward, not the identity "lse" uses), and the
`attention_impl` runtime field."""
from __future__ import annotations

import jax
import numpy as np
import pytest

from mllm_tune.models import config as mc
from mllm_tune.models.attention import attention, choose_attention


def _numpy_attention(q, k, v, mask):
  b, t, n, h = q.shape
  g = n // k.shape[2]
  k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)  # head i uses KV head i // g
  logits = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(h)
  logits = np.where(mask[:, None], logits, -np.inf)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum("bnts,bsnh->btnh", p, v)


def _numpy_attention_grads(q, k, v, mask, do):
  """d/d(q, k, v) of sum(attention * do) in float64; a fully masked row (uniform weights in
  the forward) sends no gradient to q or k, as with `jnp.where` masking."""
  b, t, n, h = q.shape
  kh = k.shape[2]
  g = n // kh
  kr, vr = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
  rows = mask.any(-1)
  s = np.where(mask[:, None], np.einsum("btnh,bsnh->bnts", q, kr) / np.sqrt(h), -np.inf)
  s = np.where(rows[:, None, :, None], s, 0.0)  # the padding row: uniform weights
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  dv = np.einsum("bnts,btnh->bsnh", p, do)
  dp = np.einsum("btnh,bsnh->bnts", do, vr)
  ds = p * (dp - (dp * p).sum(-1, keepdims=True))
  ds = np.where(rows[:, None, :, None], ds, 0.0)
  dq = np.einsum("bnts,bsnh->btnh", ds, kr) / np.sqrt(h)
  dk = np.einsum("bnts,btnh->bsnh", ds, q) / np.sqrt(h)
  fold = lambda x: x.reshape(b, x.shape[1], kh, g, h).sum(3)  # sum the group's heads
  return dq, fold(dk), fold(dv)


def _inputs():
  rng = np.random.default_rng(0)
  b, t, s, n, kh, h = 2, 5, 7, 6, 2, 8
  q = rng.normal(size=(b, t, n, h)).astype(np.float32)
  k = rng.normal(size=(b, s, kh, h)).astype(np.float32)
  v = rng.normal(size=(b, s, kh, h)).astype(np.float32)
  mask = rng.random((b, t, s)) < 0.6
  mask[:, :, 0] = True  # every row sees at least one key ...
  mask[1, 3] = False    # ... except one padding row
  return q, k, v, mask


@pytest.mark.parametrize("impl", ["lse", "xla"])
def test_grouped_masked_attention_equals_float64_numpy(impl):
  q, k, v, mask = _inputs()
  b, t, _, _ = q.shape
  got = np.asarray(attention(q, k, v, mask, impl))
  rows = mask.any(-1)
  with np.errstate(invalid="ignore"):  # padding rows: NaN in the reference, not compared
    want = _numpy_attention(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64),
                          np.where(rows[..., None], mask, True))
  np.testing.assert_allclose(got[rows], want[rows], rtol=1e-5, atol=1e-6)
  assert np.isfinite(got).all()  # the fully masked row: finite, not NaN
  full = np.asarray(attention(q, k, v, None, impl))
  np.testing.assert_allclose(full, _numpy_attention(q, k, v, np.ones((b, t, k.shape[1]), bool)),
                             rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", ["lse", "xla"])
@pytest.mark.parametrize("masked", [True, False])
def test_attention_gradients_equal_float64_numpy(impl, masked):
  q, k, v, mask = _inputs()
  if not masked:
    mask = np.ones_like(mask)
  do = np.random.default_rng(1).normal(size=q.shape).astype(np.float32)
  loss = lambda q_, k_, v_: (attention(q_, k_, v_, mask if masked else None, impl) * do).sum()
  got = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
  f64 = lambda x: x.astype(np.float64)
  want = _numpy_attention_grads(f64(q), f64(k), f64(v), mask, f64(do))
  for name, g, w in zip("qkv", got, want):
    np.testing.assert_allclose(np.asarray(g), w, rtol=1e-4, atol=1e-5, err_msg=f"d{name}")


def test_lse_attention_keeps_no_probabilities_for_the_backward():
  """The point of "lse": the (B, N, T, S) probabilities are not a residual of the forward."""
  q, k, v, mask = _inputs()
  for impl, keeps in (("lse", False), ("xla", True)):
    _, vjp = jax.vjp(lambda q_, k_, v_: attention(q_, k_, v_, mask, impl), q, k, v)
    sizes = {x.size for x in jax.tree.leaves(vjp)}
    probs = q.shape[0] * q.shape[2] * q.shape[1] * k.shape[1]  # B * N * T * S
    assert (probs in sizes) == keeps, (impl, sizes)


def test_attention_impl_is_a_runtime_field_of_both_towers():
  cfg = mc.with_runtime(mc.LlavaConfig(), attention_impl="cudnn", remat_policy="full")
  assert cfg.llm.attention_impl == cfg.vision.attention_impl == "cudnn"
  assert cfg.llm.remat_policy == "full"
  with pytest.raises(mc.ConfigError, match="model.attention_impl must be one of"):
    mc.with_runtime(mc.LlavaConfig(), attention_impl="flash")
  assert mc.LlavaConfig().llm.attention_impl == mc.LlavaConfig().vision.attention_impl == "auto"
  with pytest.raises(mc.ConfigError, match="scan_unroll must be an integer"):
    mc.with_runtime(mc.LlavaConfig(), scan_unroll=0)
  with pytest.raises(mc.ConfigError, match="decode_per_layer must be"):
    mc.with_runtime(mc.LlavaConfig(), decode_per_layer="yes")
  assert mc.with_runtime(mc.LlavaConfig(), scan_unroll=4).llm.scan_unroll == 4
  with pytest.raises(mc.ConfigError, match="not runtime fields"):
    mc.with_runtime(mc.LlavaConfig(), num_layers=3)


def test_attention_impl_reaches_the_model_from_the_train_config():
  from configs import base
  from mllm_tune.train import setup
  from mllm_tune.importance.store import model_config_hash
  c = base.get_config().model
  c.tiny.vision_layers = 1
  c.attention_impl = "cudnn"
  cfg = setup.tiny_model_config(c)
  assert cfg.llm.attention_impl == cfg.vision.attention_impl == "cudnn"
  c.attention_impl = "xla"  # not part of the architecture: a Fisher still fits
  assert model_config_hash(setup.tiny_model_config(c)) == model_config_hash(cfg)


def test_lse_bfloat16_gradients_track_the_float64_reference():
  q, k, v, mask = _inputs()
  do = np.random.default_rng(1).normal(size=q.shape).astype(np.float32)
  bf = lambda x: jax.numpy.asarray(x, jax.numpy.bfloat16)
  loss = lambda q_, k_, v_: (attention(q_, k_, v_, mask, "lse").astype(np.float32) * do).sum()
  got = jax.grad(loss, argnums=(0, 1, 2))(bf(q), bf(k), bf(v))
  f64 = lambda x: np.asarray(bf(x).astype(np.float32), np.float64)  # the bf16 inputs, exactly
  want = _numpy_attention_grads(f64(q), f64(k), f64(v), mask, do.astype(np.float64))
  for name, g, w in zip("qkv", got, want):
    assert g.dtype == jax.numpy.bfloat16
    err = np.abs(np.asarray(g.astype(np.float32)) - w).max() / np.abs(w).max()
    assert err < 3e-2, (name, err)


_GPU = dict(platform="cuda", dtype="bfloat16", head_dim=128, q_len=2048, kv_len=2048,
            training=True, max_head_dim=256)


@pytest.mark.parametrize("change, impl, reason", [
    ({}, "cudnn", "supported"),
    ({"platform": "cpu"}, "lse", "platform cpu"),
    ({"platform": "rocm"}, "lse", "platform rocm"),
    ({"dtype": "float32"}, "lse", "dtype float32"),
    ({"dtype": "float16"}, "cudnn", "supported"),
    ({"head_dim": 60}, "lse", "head dim 60"),
    ({"head_dim": 256}, "cudnn", "supported"),
    ({"head_dim": 256, "max_head_dim": 128}, "lse", "head dim 256"),
    # CLIP ViT-B/16 at 224 px: 197 tokens; JAX's cuDNN backward rejects odd lengths
    ({"q_len": 197, "kv_len": 197}, "lse", "odd length (Q 197, KV 197)"),
    ({"q_len": 197, "kv_len": 197, "training": False}, "cudnn", "supported"),
    ({"q_len": 1, "kv_len": 77, "training": False}, "cudnn", "supported"),  # decoding step
    ({"kv_len": 2049}, "lse", "odd length"),
])
def test_auto_attention_takes_cudnn_only_where_it_runs(change, impl, reason):
  got = choose_attention("auto", **{**_GPU, **change})
  assert got.implementation == impl and reason in got.reason, got


def test_explicit_attention_choices():
  assert choose_attention("lse", **_GPU).implementation == "lse"
  assert choose_attention("xla", **{**_GPU, "platform": "cpu"}).implementation == "xla"
  assert choose_attention("cudnn", **_GPU) == ("cudnn", "requested")
  with pytest.raises(ValueError, match="cannot run this call: odd length .* use attention_impl "
                                       "'auto'"):
    choose_attention("cudnn", **{**_GPU, "q_len": 577, "kv_len": 577})
  with pytest.raises(ValueError, match="must be one of"):
    choose_attention("flash", **_GPU)


def test_auto_on_cpu_is_the_lse_program_and_logs_each_site_once(caplog, monkeypatch):
  """On CPU "auto" runs "lse" (same output, same jaxpr) and says so once per call site."""
  import logging
  from mllm_tune.models import attention as att
  monkeypatch.setattr(att, "backend_facts", lambda: ("cpu", 128))  # also when run on a GPU
  q, k, v, mask = _inputs()
  fn = lambda impl: jax.make_jaxpr(lambda a, b, c: attention(a, b, c, mask, impl,
                                                             site="test site"))(q, k, v)
  with caplog.at_level(logging.INFO, logger="mllm_tune.attention"):
    auto, lse = fn("auto"), fn("lse")
    fn("auto")
  assert str(auto) == str(lse)
  logged = [r.getMessage() for r in caplog.records if "test site" in r.getMessage()]
  assert len(logged) == 1 and "lse (cuDNN not taken: platform cpu" in logged[0], logged


def test_auto_attention_per_call_site_on_a_simulated_gpu(monkeypatch):
  """The towers pass their own shapes and whether the call may be differentiated: on a
  (simulated) Hopper GPU in bf16, training picks cuDNN for the LLM (even length) and "lse" for
  the CLIP tower (odd: 4 patches + CLS); a KV-cache decode step is not differentiated and may
  use cuDNN at any length. jax.nn.dot_product_attention is replaced by a recorder (no cuDNN on
  this machine); nothing runs, the programs are only traced."""
  import jax.numpy as jnp
  from mllm_tune.models import attention as att, build_model, init_params
  from mllm_tune.models.config import LLMConfig, LlavaConfig, VisionConfig
  from mllm_tune.models.kv_cache import init_kv_cache
  calls = []

  def fake_dpa(q, k, v, mask=None, implementation=None, is_causal=False):
    calls.append((implementation, q.shape[1], k.shape[1], is_causal))
    return jnp.zeros_like(q)
  monkeypatch.setattr(att, "backend_facts", lambda: ("cuda", 256))
  monkeypatch.setattr(jax.nn, "dot_product_attention", fake_dpa)
  llm = LLMConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                  num_heads=4, num_kv_heads=2, dtype="bfloat16")
  vision = VisionConfig(hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2,
                        image_size=28, patch_size=14, dtype="bfloat16")
  model = build_model(LlavaConfig(vision=vision, llm=llm, image_token_id=63))
  params = init_params(model, jax.random.key(0))
  calls.clear()
  ids = jnp.asarray([[1] + [63] * 4 + [7, 8, 9]])  # 8 tokens; the tower sees CLS + 2x2 = 5
  px = jnp.zeros((1, 28, 28, 3))
  loss = lambda p: model.apply({"params": p}, input_ids=ids, attention_mask=jnp.ones_like(ids),
                               pixel_values=px).astype(jnp.float32).sum()
  jax.eval_shape(jax.grad(loss), params)
  # the LLM, told its mask is causal; the CLIP tower (odd length) runs lse
  assert set(calls) == {("cudnn", 8, 8, True)}, calls
  calls.clear()
  cache = init_kv_cache(llm, 1, 16, jnp.bfloat16)
  one = jnp.asarray([[5]])
  jax.eval_shape(lambda p: model.apply({"params": p}, input_ids=one,
                                       attention_mask=jnp.ones((1, 16), jnp.int32),
                                       positions=jnp.asarray([[7]]), kv_cache=cache,
                                       cache_index=jnp.asarray(7)), params)
  assert calls and all(c[0] == "cudnn" and c[1] == 1 and not c[3] for c in calls), calls


def test_causal_flag_gives_the_same_result_for_a_causal_mask():
  """`causal=True` (the fused kernels skip the upper triangle) changes nothing when the mask is
  causal with padding, as the LLM builds it; checked through XLA's fused path on CPU."""
  rng = np.random.default_rng(3)
  b, t, n, kh, h = 2, 6, 4, 2, 8
  q = rng.normal(size=(b, t, n, h)).astype(np.float32)
  k, v = (rng.normal(size=(b, t, kh, h)).astype(np.float32) for _ in range(2))
  valid = np.array([[1] * 6, [0, 0, 1, 1, 1, 1]], bool)  # left padding in row 1
  mask = np.tril(np.ones((t, t), bool))[None] & valid[:, None, :]
  mask[1, :2] = False  # padding queries see nothing
  with np.errstate(invalid="ignore"):  # padding rows: NaN in the reference, not compared
    want = _numpy_attention(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64),
                            mask)
  got = np.asarray(attention(q, k, v, mask, "xla", causal=True))
  rows = mask.any(-1)
  np.testing.assert_allclose(got[rows], want[rows], atol=1e-5)
  np.testing.assert_array_equal(got, np.asarray(attention(q, k, v, mask, "xla")))


def test_causal_blocks_cover_the_queries_and_shrink_the_work():
  from mllm_tune.models.attention import causal_blocks
  assert causal_blocks(100) == [(0, 100)]
  assert causal_blocks(256) == [(0, 128), (128, 256)]
  assert causal_blocks(512) == [(0, 128), (128, 256), (256, 384), (384, 512)]
  assert causal_blocks(2048) == [(0, 512), (512, 1024), (1024, 1536), (1536, 2048)]
  assert causal_blocks(7, rows=2) == [(0, 3), (3, 6), (6, 7)]


def test_causal_lse_attention_in_blocks_equals_float64_numpy(monkeypatch):
  """`causal=True` runs "lse" in query blocks (forced to 3 blocks of a 7-token row here): the
  output and the q/k/v gradients equal the float64 reference on a causal mask with left padding
  and a packed second segment, i.e. the keys each block leaves out are exactly the masked ones."""
  from mllm_tune.models import attention as att
  calls = []
  real = att._causal_attention

  def spy(q, k, v, mask, blocks):
    calls.append(blocks)
    return real(q, k, v, mask, att.causal_blocks(q.shape[3], rows=2))
  monkeypatch.setattr(att, "_causal_attention", spy)
  rng = np.random.default_rng(5)
  b, t, n, kh, h = 2, 7, 4, 2, 8
  q = rng.normal(size=(b, t, n, h)).astype(np.float32)
  k, v = (rng.normal(size=(b, t, kh, h)).astype(np.float32) for _ in range(2))
  mask = np.tril(np.ones((t, t), bool))[None].repeat(b, 0)
  mask[0, :, :2] = False  # row 0: two left-padding keys ...
  mask[0, :2] = False     # ... and their queries see nothing
  seg = np.array([0, 0, 0, 1, 1, 1, 1])  # row 1: two packed records
  mask[1] &= seg[:, None] == seg[None, :]
  rows = mask.any(-1)
  do = rng.normal(size=q.shape).astype(np.float32) * rows[..., None, None]
  got = np.asarray(attention(q, k, v, mask, "lse", causal=True))
  assert calls and len(att.causal_blocks(t, rows=2)) == 3
  f64 = lambda x: x.astype(np.float64)
  with np.errstate(invalid="ignore"):
    want = _numpy_attention(f64(q), f64(k), f64(v), mask)
  np.testing.assert_allclose(got[rows], want[rows], rtol=1e-5, atol=1e-6)
  assert np.isfinite(got).all()
  loss = lambda q_, k_, v_: (attention(q_, k_, v_, mask, "lse", causal=True) * do).sum()
  grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
  for name, g, w in zip("qkv", grads, _numpy_attention_grads(f64(q), f64(k), f64(v), mask,
                                                               f64(do))):
    np.testing.assert_allclose(np.asarray(g), w, rtol=1e-4, atol=1e-5, err_msg=f"d{name}")


def _f32_outputs(hlo: str, op: str) -> list[int]:
  """Element counts of the f32 results of `op` instructions (also inside fusions) in HLO text."""
  import re
  sizes = []
  for m in re.finditer(r"= f32\[([\d,]*)\]\{[^}]*\} " + op + r"\(", hlo):
    dims = [int(d) for d in m.group(1).split(",") if d]
    sizes.append(int(np.prod(dims)) if dims else 1)
  return sizes


def test_lse_causal_gradient_program_has_no_full_or_transposed_score_blocks():
  """The compiled CPU program of the causal "lse" gradient (T = 512, so 4 query blocks) holds no
  f32 (T, S) score block of a whole row range (each block has T/4 query rows), and no copy or
  transpose of a score block (dV, dK are computed transposed): the two properties that made the
  training step faster, checked on the optimized HLO."""
  b, t, n, kh, h = 1, 512, 4, 2, 16
  q = jax.ShapeDtypeStruct((b, t, n, h), np.float32)
  kv = jax.ShapeDtypeStruct((b, t, kh, h), np.float32)
  mask = jax.ShapeDtypeStruct((b, t, t), np.bool_)
  loss = lambda q_, k_, v_, m_: attention(q_, k_, v_, m_, "lse", causal=True).sum()
  hlo = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, kv, kv, mask).compile().as_text()
  full = b * n * t * t  # every head's (T, S) scores at once
  block = b * n * (t // 4) * t  # the largest query block's
  produced = [s for op in ("dot", "exponential", "select", "multiply") for s in
              _f32_outputs(hlo, op)]
  assert produced and max(produced) <= block < full, sorted(set(produced))[-3:]
  moved = _f32_outputs(hlo, "copy") + _f32_outputs(hlo, "transpose")
  assert not moved or max(moved) < block // 4, sorted(set(moved))[-3:]


def test_lse_groups_rule():
  """Per-(batch, KV head) groups on one CPU device above the score-size threshold only."""
  from mllm_tune.models.attention import GROUP_BYTES, lse_groups
  assert GROUP_BYTES == 64 * 2**20
  assert lse_groups("cpu", 1, 4, 8, 1024, 1024)       # 128 MiB of float32 scores
  assert not lse_groups("cpu", 1, 4, 8, 512, 512)     # 32 MiB: the batched call is faster
  assert not lse_groups("cpu", 2, 4, 8, 1024, 1024)   # a mesh: no loop over a sharded axis
  assert not lse_groups("cuda", 1, 4, 8, 1024, 1024)
  assert not lse_groups("cpu", 1, 1, 1, 8192, 8192)   # one group: nothing to loop over
  assert lse_groups("cpu", 1, 2, 2, 8, 8, group_bytes=0)


@pytest.mark.parametrize("causal", [False, True])
def test_lse_attention_per_group_equals_float64_numpy(monkeypatch, causal):
  """The grouped "lse" path (forced by a zero threshold): one `lax.map` step per (batch, KV
  head) group, each reading its row's mask; values and q/k/v gradients equal the float64
  reference, with a padding row, left padding and GQA (2 query heads per KV head)."""
  from mllm_tune.models import attention as att
  monkeypatch.setattr(att, "GROUP_BYTES", 0)
  groups = []
  real = att._per_group
  monkeypatch.setattr(att, "_per_group", lambda fn, q, *a: groups.append(q.shape[:2]) or
                      real(fn, q, *a))
  if causal:
    rng = np.random.default_rng(7)
    b, t, n, kh, h = 2, 7, 4, 2, 8
    q = rng.normal(size=(b, t, n, h)).astype(np.float32)
    k, v = (rng.normal(size=(b, t, kh, h)).astype(np.float32) for _ in range(2))
    mask = np.tril(np.ones((t, t), bool))[None].repeat(b, 0)
    mask[1, :, :2] = False  # row 1: left padding (two keys, and their queries see nothing)
    mask[1, :2] = False
  else:
    q, k, v, mask = _inputs()
  rows = mask.any(-1)
  do = np.random.default_rng(2).normal(size=q.shape).astype(np.float32) * rows[..., None, None]
  f = lambda q_, k_, v_: attention(q_, k_, v_, mask, "lse", causal=causal)
  got = np.asarray(f(q, k, v))
  assert groups == [(q.shape[0], k.shape[2])]  # (B, K) groups, looped
  f64 = lambda x: x.astype(np.float64)
  with np.errstate(invalid="ignore"):
    want = _numpy_attention(f64(q), f64(k), f64(v), np.where(rows[..., None], mask, True))
  np.testing.assert_allclose(got[rows], want[rows], rtol=1e-5, atol=1e-6)
  assert np.isfinite(got).all()
  grads = jax.grad(lambda *a: (f(*a) * do).sum(), argnums=(0, 1, 2))(q, k, v)
  for name, g, w in zip("qkv", grads, _numpy_attention_grads(f64(q), f64(k), f64(v), mask,
                                                               f64(do))):
    np.testing.assert_allclose(np.asarray(g), w, rtol=1e-4, atol=1e-5, err_msg=f"d{name}")
