"""Additive methods without a PEFT reference: NumPy formulas (float64), identity at init, VPT,
trainable counts (docs/methods.md §9), merge refusal, virtual tokens with the KV cache and
packing."""
from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mllm_tune as mt
import mllm_tune.tuning.additive  # noqa: F401  (registers the additive methods)
from mllm_tune.models import build_model, init_kv_cache, param_shapes
from mllm_tune.models.config import CausalLMConfig, LLMConfig, LlavaConfig, VisionConfig
from mllm_tune.models.layers import Linear
from mllm_tune.models.llm import MLP
from mllm_tune.tuning.api import MethodError
from mllm_tune.pytree import SelectorError

LLM = LLMConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=3, num_heads=4,
                num_kv_heads=2, head_dim=8, max_position_embeddings=128)
VISION = VisionConfig(hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2,
                      image_size=28, patch_size=14)
IMG = 63


def numpy_params(model, seed: int = 0) -> dict:
  """Random params without compiling `init` (slow on CPU): N(0, 0.1^2), norm scales 1."""
  rng = np.random.RandomState(seed)
  fill = lambda p, s: (np.ones(s.shape, np.float32) if p[-1].key == "scale"
                       else (rng.randn(*s.shape) * 0.1).astype(np.float32))
  return jax.tree_util.tree_map_with_path(fill, param_shapes(model))


class Tiny:
  """A model, its params, one batch, a jitted apply and the base logits, shared by a module."""

  def __init__(self, model, batch):
    self.model, self.batch = model, batch
    self.params = numpy_params(model)
    self.apply = jax.jit(model.apply)
    self.base = self.logits({"params": self.params})
    self.vision = jax.jit(lambda v, x: model.apply(
        v, x, method=lambda m, y: m.vision(y, m.config.vision_feature_layer)))

  def logits(self, variables, *args, **kw):
    if not args:
      ids, mask, px = self.batch
      args, kw = (ids, mask), ({"pixel_values": px} if px is not None else {})
    return np.asarray(self.apply(variables, *args, **kw))


@pytest.fixture(scope="module")
def llava():
  model = build_model(LlavaConfig(vision=VISION, llm=LLM, image_token_id=IMG))
  per = model.config.image_seq_len
  ids = np.array([[1, 5] + [IMG] * per + [7, 8, 9], [1, 20, 21, 22, 23, 24] + [0] * (per - 1)])
  mask = np.array([[1] * (per + 5), [1] * 6 + [0] * (per - 1)])
  px = np.random.RandomState(0).randn(1, 28, 28, 3).astype(np.float32)
  return Tiny(model, (ids, mask, px))


@pytest.fixture(scope="module")
def causal_lm():
  rng = np.random.RandomState(0)
  ids = rng.randint(3, 64, (2, 8))
  mask = np.array([[1] * 8, [0, 0] + [1] * 6])
  return Tiny(build_model(CausalLMConfig(llm=LLM)), (ids, mask, None))


def randomized(variables, names, scale=0.3, seed=0):
  rng = np.random.RandomState(seed)
  fn = lambda p, x: (jnp.asarray(rng.randn(*x.shape) * scale, jnp.float32)
                     if p[-1].key in names else x)
  return {**variables, "adapters": jax.tree_util.tree_map_with_path(fn, variables["adapters"])}


# ----------------------------------------------------------------------------- formulas
def test_bottleneck_hook_matches_numpy_formula():
  rng = np.random.RandomState(0)
  x, k, b = rng.randn(2, 5, 6), rng.randn(6, 4), rng.randn(4)
  dn, dn_b, up, up_b = rng.randn(4, 3), rng.randn(3), rng.randn(3, 4), rng.randn(4)
  f32 = lambda *a: [np.float32(v) for v in a]
  adapters = dict(zip(["bottleneck_down", "bottleneck_down_bias", "bottleneck_up",
                       "bottleneck_up_bias"], f32(dn, dn_b, up, up_b)))
  y = Linear(4, use_bias=True).apply({"params": {"kernel": np.float32(k), "bias": np.float32(b)},
                                      "adapters": adapters}, np.float32(x))
  from scipy.special import erf
  h = x @ k + b
  z = h @ dn + dn_b
  ref = h + (0.5 * z * (1 + erf(z / np.sqrt(2)))) @ up + up_b  # exact GELU
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


def test_parallel_adapter_hook_matches_numpy_formula():
  rng = np.random.RandomState(1)
  x = rng.randn(2, 5, LLM.hidden_size)
  mlp = MLP(LLM)
  params = mlp.init(jax.random.key(0), np.float32(x))["params"]
  dn, up = rng.randn(LLM.hidden_size, 6) * 0.3, rng.randn(6, LLM.hidden_size) * 0.3
  adapters = {"parallel_down": np.float32(dn), "parallel_up": np.float32(up),
              "parallel_scale": np.float32(4.0)}
  y = mlp.apply({"params": params, "adapters": adapters}, np.float32(x))
  k = lambda n: np.asarray(params[n]["kernel"], np.float64)
  g = x @ k("gate_proj")
  ffn = (g / (1 + np.exp(-g)) * (x @ k("up_proj"))) @ k("down_proj")
  ref = ffn + 4.0 * np.maximum(x @ dn, 0) @ up
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


def test_houlsby_adapter_is_near_identity_at_init_and_learns(llava):
  v = mt.tuning.get("adapter", bottleneck=8).init_variables(jax.random.key(0), llava.params)
  rel = np.linalg.norm(llava.logits(v) - llava.base) / np.linalg.norm(llava.base)
  assert 0 < rel < 1e-2  # near identity (docs/methods.md §3.1), but the adapters do run
  moved = llava.logits(randomized(v, ("bottleneck_down", "bottleneck_up"), scale=1.0))
  assert np.abs(moved - llava.base).max() > 1e-2


def test_parallel_adapter_is_exact_identity_at_init_and_learns(llava):
  v = mt.tuning.get("parallel_adapter", bottleneck=8).init_variables(jax.random.key(0),
                                                                     llava.params)
  np.testing.assert_array_equal(llava.logits(v), llava.base)
  assert np.abs(np.asarray(v["adapters"]["llm"]["layers"]["mlp"]["parallel_down"])).max() > 0
  moved = llava.logits(randomized(v, ("parallel_up",)))
  assert np.abs(moved - llava.base).max() > 1e-2


# ----------------------------------------------------------------------------- VPT
def np_clip_features(p, cfg: VisionConfig, px, feature_layer, shallow=None, deep=None):
  """float64 NumPy CLIP tower with VPT prompts: hidden_states[feature_layer], prompts dropped."""
  f = lambda x: np.asarray(x, np.float64)
  ln = lambda x, q: ((x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True)
                                                               + cfg.layer_norm_eps)
                     * f(q["scale"]) + f(q["bias"]))
  lin = lambda x, q, i: x @ f(q["kernel"][i]) + f(q["bias"][i])
  n, s, d = px.shape[0], cfg.patch_size, cfg.hidden_size
  g = cfg.image_size // s
  patches = f(px).reshape(n, g, s, g, s, 3).transpose(0, 1, 3, 2, 4, 5).reshape(n, g * g, -1)
  x = patches @ f(p["embed"]["patch_kernel"]).reshape(-1, d)
  x = np.concatenate([np.broadcast_to(f(p["embed"]["class_embedding"]), (n, 1, d)), x], 1)
  x = ln(x + f(p["embed"]["position_embedding"]), p["pre_norm"])
  prompts = shallow if shallow is not None else (None if deep is None else deep[0])
  num_p = 0 if prompts is None else prompts.shape[0]
  if num_p:
    x = np.concatenate([x[:, :1], np.broadcast_to(f(prompts), (n, num_p, d)), x[:, 1:]], 1)
  hidden = [x]
  lay = p["layers"]
  sub = lambda tree, i: jax.tree.map(lambda a: a[i], tree)
  for i in range(cfg.num_layers):
    if deep is not None:
      x = np.concatenate([x[:, :1], np.broadcast_to(f(deep[i]), (n, num_p, d)), x[:, 1 + num_p:]],
                         1)
    h = ln(x, sub(lay["norm1"], i))
    heads = lambda z: z.reshape(n, -1, cfg.num_heads, d // cfg.num_heads)
    q, k, v = (heads(lin(h, lay["attn"][f"{c}_proj"], i)) for c in "qkv")
    a = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d // cfg.num_heads)
    a = np.exp(a - a.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    o = np.einsum("bhqk,bkhd->bqhd", a, v).reshape(n, -1, d)
    x = x + lin(o, lay["attn"]["out_proj"], i)
    h = lin(ln(x, sub(lay["norm2"], i)), lay["mlp"]["fc1"], i)
    x = x + lin(h * (1 / (1 + np.exp(-1.702 * h))), lay["mlp"]["fc2"], i)
    hidden.append(x)
  out = hidden[feature_layer]
  return np.concatenate([out[:, :1], out[:, 1 + num_p:]], 1)


def vision_features(tiny, variables):
  return np.asarray(tiny.vision(variables, tiny.batch[2]))


@pytest.mark.parametrize("deep", [False, True])
def test_vpt_matches_numpy_tower(llava, deep):
  method = mt.tuning.get("vpt", num_tokens=3, deep=deep)
  v = method.init_variables(jax.random.key(2), llava.params)
  prompts = np.asarray(v["adapters"]["vision"][method.leaf])
  bound = method.init_bound(llava.params)
  assert np.isclose(bound, np.sqrt(6 / (3 * 14 ** 2 + 16)))
  assert np.abs(prompts).max() <= bound and prompts.std() > bound / 3
  ours = vision_features(llava, v)
  kw = {"deep": prompts} if deep else {"shallow": prompts}
  ref = np_clip_features(llava.params["vision"], VISION, llava.batch[2], -2, **kw)
  np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)
  base = vision_features(llava, {"params": llava.params})
  assert ours.shape == base.shape and np.abs(ours - base).max() > 1e-3


def test_vpt_with_zero_tokens_equals_base_and_keeps_feature_shapes(llava):
  v0 = mt.tuning.get("vpt", num_tokens=0).init_variables(jax.random.key(0), llava.params)
  np.testing.assert_array_equal(llava.logits(v0), llava.base)
  v = mt.tuning.get("vpt", num_tokens=4, deep=True).init_variables(jax.random.key(0),
                                                                   llava.params)
  feats = jax.eval_shape(lambda: llava.model.apply(v, llava.batch[2],
                                                   method=lambda m, x: m.image_features(x)))
  assert feats.shape == (1, llava.model.config.image_seq_len, LLM.hidden_size)
  out = llava.logits(v)
  assert out.shape == llava.base.shape and np.abs(out - llava.base).max() > 1e-4


def test_vpt_prompt_dropout_acts_only_with_a_dropout_rng(llava):
  v = mt.tuning.get("vpt", num_tokens=6, dropout=0.5).init_variables(jax.random.key(0),
                                                                     llava.params)
  assert float(v["adapters"]["vision"]["prompt_dropout"]) == 0.5
  plain = {**v, "adapters": {"vision": {"prompt_tokens": v["adapters"]["vision"]["prompt_tokens"]}}}
  run = jax.jit(lambda v, rng: llava.model.apply(
      v, llava.batch[2], rngs=rng, method=lambda m, x: m.vision(x, -2)))
  np.testing.assert_array_equal(run(v, {}), run(plain, {}))  # eval: no dropout
  assert np.abs(run(v, {"dropout": jax.random.key(1)}) - run(plain, {})).max() > 1e-4


# ----------------------------------------------------------------------------- counts, merge
L, D, T, DFF, LV, DV = 3, 32, 16, 48, 2, 16  # t = K * H = 2 * 8
COUNTS = [
    ("adapter", {"bottleneck": 4}, 2 * L * (2 * D * 4 + 4 + D)),
    ("adapter", {"bottleneck": 4, "targets": r"llm/layers_[01]/(attn/o_proj|mlp/down_proj)"},
     2 * 2 * (2 * D * 4 + 4 + D)),
    ("adapter", {"bottleneck": 4, "train_norms": r"llm/layers_\d+/(input|post_attn)_norm/scale"},
     2 * L * (2 * D * 4 + 4 + D) + 2 * L * D),  # + the block norms, as the paper
    ("parallel_adapter", {"bottleneck": 4}, L * 2 * D * 4),
    ("prompt_tuning", {"num_virtual_tokens": 5}, 5 * D),
    ("prefix_tuning", {"num_virtual_tokens": 5, "prefix_projection": False}, 5 * 2 * L * T),
    ("prefix_tuning", {"num_virtual_tokens": 5, "encoder_hidden_size": 7},
     5 * T + (T * 7 + 7) + (7 * 2 * L * T + 2 * L * T)),
    ("ia3", {}, L * (2 * T + DFF)),
    ("llama_adapter", {"adapter_len": 3, "adapter_layers": 2}, 2 * (3 * D + 1)),
    ("vpt", {"num_tokens": 3}, 3 * DV),
    ("vpt", {"num_tokens": 3, "deep": True}, 3 * DV * LV),
]


@pytest.mark.parametrize("name,cfg,want", COUNTS)
def test_trainable_counts_match_methods_section_9(llava, name, cfg, want):
  params = llava.params
  method = mt.tuning.get(name, **cfg)
  v = method.init_variables(jax.random.key(0), params)
  table, n, _ = mt.tuning.trainable_table(v, method.trainable(v))
  assert n == want, table
  train, _ = mt.tuning.partition(v, method.trainable(v))
  assert ("params" in train) == bool(cfg.get("train_norms"))  # otherwise the base stays frozen


@pytest.mark.parametrize("name", ["adapter", "parallel_adapter", "prompt_tuning", "prefix_tuning",
                                  "llama_adapter", "vpt"])
def test_non_mergeable_methods_refuse_merge(llava, name):
  method = mt.tuning.get(name, **({"adapter_layers": 2} if name == "llama_adapter" else {}))
  v = method.init_variables(jax.random.key(0), llava.params)
  with pytest.raises(MethodError, match=f"'{name}' adds modules that cannot be folded"):
    method.merge(v)


def test_ia3_merge_equals_unmerged(llava):
  method = mt.tuning.get("ia3", targets=r"llm/layers_\d+/(attn/(k|v)_proj|mlp/down_proj)|"
                                        r"projector/linear_1")
  v = randomized(method.init_variables(jax.random.key(0), llava.params), ("ia3_in", "ia3_out"))
  unmerged = llava.logits(v)
  np.testing.assert_allclose(llava.logits({"params": method.merge(v)}), unmerged, atol=1e-4)
  assert np.abs(unmerged - llava.base).max() > 1e-2


# ----------------------------------------------------------------------------- virtual tokens
def _virtual_token_variables(params):
  method = mt.tuning.compose(
      mt.tuning.get("prefix_tuning", num_virtual_tokens=2, encoder_hidden_size=8),
      mt.tuning.get("prompt_tuning", num_virtual_tokens=3, prompt_init="random"),
      mt.tuning.get("llama_adapter", adapter_len=2, adapter_layers=2))
  v = method.init_variables(jax.random.key(3), params)
  return randomized(v, ("adaption_gate",), scale=1.0)


def test_prompt_prefix_and_llama_adapter_decode_with_kv_cache_and_generate(causal_lm):
  """Greedy decoding through the KV cache: same tokens as `mt.generate`, same logits as one full
  forward over the final sequence (virtual tokens never enter the cache)."""
  lm = causal_lm
  v = _virtual_token_variables(lm.params)
  ids, mask, _ = lm.batch
  new = 3
  cache_mask = np.concatenate([mask, np.ones((2, new), mask.dtype)], 1)
  pos = np.maximum(np.cumsum(cache_mask, -1) - 1, 0)
  out, cache = lm.apply(v, ids, cache_mask, pos[:, :8], kv_cache=init_kv_cache(LLM, 2, 8 + new),
                        cache_index=0)
  steps, tokens = [out], [out[:, -1].argmax(-1)]
  for t in range(8, 8 + new - 1):
    out, cache = lm.apply(v, tokens[-1][:, None], cache_mask, pos[:, t:t + 1], kv_cache=cache,
                          cache_index=jnp.int32(t))
    steps.append(out)
    tokens.append(out[:, -1].argmax(-1))
  tokens = np.stack(tokens, 1)
  np.testing.assert_array_equal(np.asarray(mt.generate(
      lm.model, lm.params, ids, mask, max_new_tokens=new, adapters=v["adapters"])), tokens)
  full = lm.logits(v, np.concatenate([ids, tokens], 1), cache_mask)
  assert full.shape == (2, 8 + new, LLM.vocab_size)
  real = cache_mask[:, :-1].astype(bool)
  np.testing.assert_allclose(np.concatenate(steps, 1)[real], full[:, :-1][real], atol=1e-5)
  assert np.abs(full[:, :8] - lm.base).max() > 1e-2  # the virtual tokens matter


def test_every_packed_segment_sees_the_virtual_tokens(causal_lm):
  v = _virtual_token_variables(causal_lm.params)
  a, b = [1, 5, 6, 7], [1, 9, 10]
  seg = np.array([[1] * len(a) + [2] * len(b)])
  pos = np.array([list(range(len(a))) + list(range(len(b)))])
  packed = causal_lm.logits(v, np.array([a + b]), None, pos, seg)
  alone = causal_lm.logits(v, np.array([a, b + [0]]), np.array([[1] * 4, [1] * 3 + [0]]))
  np.testing.assert_allclose(packed[0, :4], alone[0], atol=1e-5)
  np.testing.assert_allclose(packed[0, 4:], alone[1, :3], atol=1e-5)


# ----------------------------------------------------------------------------- configs, errors
@pytest.mark.parametrize("name", ["adapter", "parallel_adapter", "prompt_tuning", "prefix_tuning",
                                  "ia3", "llama_adapter", "vpt"])
def test_method_configs_build_their_method(name):
  cfg = importlib.import_module(f"configs.methods.{name}").get_config()
  method = mt.tuning.from_config(cfg)
  assert method.name == name and method.family == "additive"


def test_bad_options_and_targets_are_clear_errors(causal_lm):
  params = causal_lm.params
  with pytest.raises(MethodError, match="adapter_layers=5 but the LLM has 3 layers"):
    mt.tuning.get("llama_adapter", adapter_layers=5).init(jax.random.key(0), params)
  with pytest.raises(MethodError, match="needs a vision tower"):
    mt.tuning.get("vpt").init(jax.random.key(0), params)
  with pytest.raises(SelectorError, match="matches no FFN module path.*llm/layers_0/mlp"):
    mt.tuning.get("parallel_adapter", targets=r"llm/layers_\d+/ffn").init(jax.random.key(0),
                                                                          params)
  with pytest.raises(MethodError, match="feedforward module .* is not among the targets"):
    mt.tuning.get("ia3", targets=r"llm/layers_\d+/attn/k_proj").init(jax.random.key(0), params)
  with pytest.raises(MethodError, match="prompt_init must be"):
    mt.tuning.get("prompt_tuning", prompt_init="text")
  with pytest.raises(MethodError, match="gate_fn must be"):
    mt.tuning.get("llama_adapter", gate_fn="sigmoid")
