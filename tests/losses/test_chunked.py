"""The fused, chunked LM head + cross-entropy (`losses.chunked`): value, counts and gradients
against float64 NumPy for every chunking (chunk not dividing T, chunk > T, bf16); in the train
step, the same loss and gradients as the full-logits path (own head, tied embeddings, LoRA on the
head, LLaVA with an image); a frozen head's gradient matmul is compiled away; methods and
penalties that read the logits keep the full-logits path."""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mllm_tune as mt
from mllm_tune.models import build_model, param_shapes
from mllm_tune.models.config import CausalLMConfig, LLMConfig, LlavaConfig, VisionConfig
from mllm_tune.train import step as step_lib
from mllm_tune.losses.chunked import chunked_token_ce
from mllm_tune.tuning import api as tuning_api
from mllm_tune import penalties, pytree as select
from tests.helpers.env import cpu_env

B, T, D, V = 3, 7, 5, 13


def _numpy_ref(h, w, ids, mask):
  """Summed NLL, count, correct, d/dh, d/dW of a linear head + next-token CE, float64."""
  h64, w64 = h.astype(np.float64), w.astype(np.float64)
  x = h64 @ w64
  tgt = np.pad(ids[:, 1:], ((0, 0), (0, 1)))
  wt = np.pad(mask[:, 1:], ((0, 0), (0, 1))).astype(np.float64)
  m = x.max(-1, keepdims=True)
  logz = m[..., 0] + np.log(np.exp(x - m).sum(-1))
  picked = np.take_along_axis(x, tgt[..., None], -1)[..., 0]
  d = (np.exp(x - logz[..., None]) - np.eye(V)[tgt]) * wt[..., None]
  correct = ((x.argmax(-1) == tgt) * wt).sum()
  return ((logz - picked) * wt).sum(), wt.sum(), correct, d @ w64.T, np.einsum("btd,btv->dv",
                                                                                 h64, d)


def _data(dtype):
  rng = np.random.default_rng(0)
  h = np.asarray(jnp.asarray(rng.normal(size=(B, T, D)), dtype).astype(jnp.float32))
  w = np.asarray(jnp.asarray(rng.normal(size=(D, V)), dtype).astype(jnp.float32))
  ids = rng.integers(0, V, size=(B, T)).astype(np.int32)
  ids[0, 1:] = (h[0, :-1] @ w).argmax(-1)  # some correct predictions
  mask = (rng.random((B, T)) < 0.7).astype(np.int32)
  return h, w, ids, mask


@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("chunk,dtype", [(1, jnp.float32), (3, jnp.float32), (7, jnp.float32),
                                         (100, jnp.float32), (3, jnp.bfloat16)])
def test_chunked_ce_equals_float64_numpy(chunk, dtype, per_row):
  h, w, ids, mask = _data(dtype)
  head = lambda h_BcD, hv: jnp.matmul(h_BcD, hv["w"]).astype(jnp.float32)

  def loss(h_, w_):
    nll, n, correct = chunked_token_ce(head, {"w": w_}, h_, ids, mask, chunk, per_row)
    return nll, (n, correct)
  (nll, (n, correct)), (dh, dw) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1),
                                                             has_aux=True))(
      jnp.asarray(h, dtype), jnp.asarray(w, dtype))
  want = _numpy_ref(h, w, ids, mask)
  tol = 1e-5 if dtype == jnp.float32 else 3e-2
  np.testing.assert_allclose(float(nll), want[0], rtol=tol)
  assert float(n) == want[1]
  if dtype == jnp.float32:  # bf16 logits can tie differently
    assert float(correct) == want[2]
  assert dh.dtype == dtype and dw.dtype == dtype
  np.testing.assert_allclose(np.asarray(dh, np.float64), want[3], atol=tol * 10, rtol=tol)
  np.testing.assert_allclose(np.asarray(dw, np.float64), want[4], atol=tol * 10, rtol=tol)
  # without differentiation (eval): the same value and counts
  nll2, n2, correct2 = jax.jit(lambda h_, w_: chunked_token_ce(head, {"w": w_}, h_, ids, mask,
                                                               chunk, per_row))(
      jnp.asarray(h, dtype), jnp.asarray(w, dtype))
  np.testing.assert_allclose(float(nll2), float(nll), rtol=1e-6)
  assert float(n2) == want[1] and float(correct2) == float(correct)


@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("chunk", [1, 2, 3])
def test_positions_without_target_cost_no_head_work(chunk, per_row):
  """Targets sit in a few scattered positions (one row has none): the loop runs only the chunks
  that hold a target after the targets are gathered to the front of the batch (or of each row,
  `per_row`; the head runs once per such chunk of B x `chunk` positions); a NaN hidden state
  where no target is reaches neither the loss nor the gradients;
  the values equal float64 NumPy on clean states."""
  _, w, _, _ = _data(jnp.float32)
  t = 16
  rng = np.random.default_rng(1)
  h = rng.normal(size=(B, t, D)).astype(np.float32)
  ids = rng.integers(0, V, size=(B, t)).astype(np.int32)
  mask = np.zeros((B, t), np.int32)
  mask[0, [3, 8, 9, 15]] = 1  # targets at positions 2, 7, 8, 14
  mask[2, [1, 2, 12, 13]] = 1
  want = _numpy_ref(h, w, ids, mask)
  no_target = np.pad(mask[:, 1:], ((0, 0), (0, 1))) == 0
  h_nan = np.where(no_target[..., None], np.nan, h).astype(np.float32)
  calls = []
  head = lambda h_BcD, hv: jnp.matmul(h_BcD, hv["w"])

  def counted(h_BcD, hv):
    jax.debug.callback(lambda: calls.append(1))
    return head(h_BcD, hv)
  f = jax.jit(jax.value_and_grad(lambda h_, w_: chunked_token_ce(
      counted, {"w": w_}, h_, ids, mask, chunk, per_row)[0], argnums=(0, 1)))
  nll, (dh, dw) = f(jnp.asarray(h_nan), jnp.asarray(w))
  jax.block_until_ready(nll)
  np.testing.assert_allclose(float(nll), want[0], rtol=1e-5)
  np.testing.assert_allclose(np.asarray(dh), want[3], atol=1e-5)
  np.testing.assert_allclose(np.asarray(dw), want[4], atol=1e-5, rtol=1e-5)
  assert np.all(np.asarray(dh)[no_target] == 0)
  # not t / chunk: 8 targets, at most 4 in a row
  assert len(calls) == (-(-4 // chunk) if per_row else -(-8 // (B * chunk)))
  # nothing to predict: no head work, zero loss and gradients
  calls.clear()
  nll, (dh, dw) = jax.jit(jax.value_and_grad(lambda h_, w_: chunked_token_ce(
      counted, {"w": w_}, h_, ids, np.zeros_like(mask), chunk, per_row)[0], argnums=(0, 1)))(
          jnp.asarray(h_nan), jnp.asarray(w))
  jax.block_until_ready(nll)
  assert float(nll) == 0 and not np.any(np.asarray(dh)) and not np.any(np.asarray(dw))
  assert calls == []


def test_chunk_must_be_positive():
  h, w, ids, mask = _data(jnp.float32)
  with pytest.raises(ValueError, match="chunk must be >= 1"):
    chunked_token_ce(lambda x, hv: x @ hv, w, h, ids, mask, 0)


def test_frozen_head_gradient_matmul_is_compiled_away():
  """Differentiating w.r.t. the hidden states only: the (D, V) head gradient (one matmul of
  2 * B * c * D * V FLOPs per chunk) must not be computed."""
  b, t, d, v, chunk = 2, 64, 32, 512, 32
  rng = np.random.default_rng(0)
  h = jnp.asarray(rng.normal(size=(b, t, d)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(d, v)), jnp.float32)
  ids = jnp.asarray(rng.integers(0, v, size=(b, t)), jnp.int32)
  mask = jnp.ones((b, t), jnp.int32)
  head = lambda x, hv: x @ hv

  def flops(argnums):
    f = jax.grad(lambda h_, w_: chunked_token_ce(head, w_, h_, ids, mask, chunk)[0],
                 argnums=argnums)
    return jax.jit(f).lower(h, w).compile().cost_analysis()["flops"]
  matmul = 2 * b * chunk * d * v  # per loop iteration (cost analysis counts the body once)
  assert flops((0, 1)) - flops(0) >= 0.9 * matmul


# ----------------------------------------------------------------------------- in the train step
LLM = LLMConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                num_kv_heads=2, head_dim=8, max_position_embeddings=64)
VISION = VisionConfig(hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                      image_size=28, patch_size=14)


def _params(model, seed=0):
  rng = np.random.RandomState(seed)
  fill = lambda p, s: (np.ones(s.shape, np.float32) if p[-1].key == "scale"
                       else (rng.randn(*s.shape) * 0.3).astype(np.float32))
  return jax.tree_util.tree_map_with_path(fill, param_shapes(model))


def _batch(model, seed=0):
  rng = np.random.RandomState(seed)
  t = 11
  if isinstance(model.config, LlavaConfig):
    per, img = model.config.image_seq_len, model.config.image_token_id
    ids = rng.randint(3, 60, (2, t + per))
    ids[0, 1:1 + per] = img
    ids[1, 2:2 + per] = img
    px = rng.randn(2, 28, 28, 3).astype(np.float32)
    mask = np.ones_like(ids)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": px,
            "loss_mask": (rng.rand(*ids.shape) < 0.8) & (ids != img)}
  ids = rng.randint(3, 60, (2, t))
  mask = np.ones_like(ids)
  mask[1, :3] = 0
  return {"input_ids": ids, "attention_mask": mask, "loss_mask": mask * (rng.rand(2, t) < 0.8)}


CASES = {
    "full_own_head": (CausalLMConfig(llm=LLM), ("freeze", {"preset": "full"})),
    "full_tied": (CausalLMConfig(llm=dataclasses.replace(LLM, tie_word_embeddings=True)),
                  ("freeze", {"preset": "full"})),
    "lora_on_head": (CausalLMConfig(llm=LLM),
                     ("lora", {"rank": 4, "targets": r"llm/(layers_0/attn/q_proj|lm_head)"})),
    "llava_lora": (LlavaConfig(vision=VISION, llm=LLM, image_token_id=63),
                   ("lora", {"rank": 4, "targets": r"llm/layers_\d+/mlp/down_proj"})),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_train_step_loss_and_gradients_equal_the_full_logits_path(case):
  cfg, (name, kw) = CASES[case]
  model = build_model(cfg)
  method = mt.tuning.get(name, **kw)
  variables = method.init_variables(jax.random.key(1), _params(model))
  if name == "lora":  # nonzero B so the adapters change the output
    variables["adapters"] = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 0.1 if p[-1].key == "lora_b" else x, variables["adapters"])
  trainable, frozen = mt.tuning.partition(variables, method.trainable(variables))
  batch = {k: jnp.asarray(v) for k, v in _batch(model).items()}
  total = batch["loss_mask"][:, 1:].sum().astype(jnp.float32)

  def grads(chunk):
    fns = step_lib.StepFns(model, method, None, loss_chunk=chunk)
    assert step_lib.chunked_loss(fns, variables) == (chunk > 0)
    g = jax.grad(step_lib.micro_loss, argnums=1, has_aux=True)
    return jax.jit(functools.partial(g, fns))(trainable, frozen, batch, jax.random.key(0),
                                              total, 1)
  ref_g, ref_aux = grads(0)
  got_g, got_aux = grads(4)
  for k in ("nll", "tokens", "correct"):
    np.testing.assert_allclose(float(got_aux[k]), float(ref_aux[k]), rtol=1e-5, err_msg=k)
  flat_ref, flat_got = select.flatten(ref_g), select.flatten(got_g)
  assert flat_ref.keys() == flat_got.keys() and flat_ref
  if case == "lora_on_head":
    assert any("lm_head/lora_b" in p for p in flat_got)
  for p, x in flat_ref.items():
    assert np.abs(np.asarray(x)).max() > 0, p
    np.testing.assert_allclose(np.asarray(flat_got[p]), np.asarray(x), rtol=2e-4, atol=1e-6,
                               err_msg=p)
  # eval_step: the chunked primal gives the same sums
  ev = lambda c: jax.jit(functools.partial(step_lib.eval_step, step_lib.StepFns(
      model, method, None, loss_chunk=c)))(frozen, trainable, batch)
  e0, e4 = ev(0), ev(4)
  for k in e0:
    np.testing.assert_allclose(float(e4[k]), float(e0[k]), rtol=1e-5, err_msg=k)


@dataclasses.dataclass(frozen=True)
class _LogitTerm(tuning_api.Method):
  """A method whose loss term reads the logits: the mean squared logit."""
  def loss_terms(self, variables, batch, logits):
    return {"sq": jnp.mean(jnp.square(logits))}


def test_methods_and_penalties_that_read_logits_keep_the_full_logits_path():
  assert not mt.tuning.get("lora", rank=2).needs_logits
  assert not mt.tuning.get("lorasculpt", rank=2).needs_logits
  assert _LogitTerm().needs_logits
  assert tuning_api.compose(mt.tuning.get("lora", rank=2), _LogitTerm()).needs_logits
  model = build_model(CausalLMConfig(llm=LLM))
  params = _params(model)
  variables = {"params": params, "adapters": {}}
  batch = {k: jnp.asarray(v) for k, v in _batch(model).items()}
  fns = step_lib.StepFns(model, _LogitTerm(), None, loss_chunk=4)
  assert not step_lib.chunked_loss(fns, variables)
  _, aux = step_lib.micro_loss(fns, {}, variables, batch, jax.random.key(0), 1.0, 1)
  logits = model.apply({"params": params}, batch["input_ids"],
                       attention_mask=batch["attention_mask"])
  np.testing.assert_allclose(float(aux["loss_terms/sq"]), float(jnp.mean(logits ** 2)),
                             rtol=1e-5)
  # a distillation penalty needs the logits too; dropout on the head needs an rng
  kl = penalties.get("kl", weight=1.0)
  lora = mt.tuning.get("lora", rank=2, targets=r"llm/layers_0/attn/q_proj")
  lv = lora.init_variables(jax.random.key(0), params)
  bound, _ = penalties.bind(kl, lora, lv)
  assert not step_lib.chunked_loss(step_lib.StepFns(model, lora, None, penalty=bound), lv)
  drop = mt.tuning.get("lora", rank=2, targets=r"llm/lm_head", dropout=0.1)
  dv = drop.init_variables(jax.random.key(0), params)
  assert not step_lib.chunked_loss(step_lib.StepFns(model, drop, None), dv)
  assert step_lib.chunked_loss(step_lib.StepFns(model, lora, None), lv)


def test_first_max_index_is_argmax_with_ties():
  from mllm_tune.losses.token import first_max_index
  rng = np.random.default_rng(0)
  x = rng.integers(0, 3, size=(4, 6, 9)).astype(np.float32)  # many ties
  x[0, 0] = 0.0
  x[1, 1] = -np.inf
  x[1, 1, 5] = -1.0
  got = first_max_index(jnp.asarray(x), jnp.asarray(x.max(-1)))
  np.testing.assert_array_equal(np.asarray(got), x.argmax(-1))


def test_integer_head_leaves_are_not_differentiated():
  h, w, ids, mask = _data(jnp.float32)
  head_vars = {"w": jnp.asarray(w), "k": jnp.int32(2)}
  head = lambda x, hv: (x @ hv["w"] * hv["k"]).astype(jnp.float32)
  dh, dv = jax.grad(lambda h_, hv: chunked_token_ce(head, hv, h_, ids, mask, 2)[0],
                    argnums=(0, 1), allow_int=True)(jnp.asarray(h), head_vars)
  want = _numpy_ref(h, 2 * w, ids, mask)
  np.testing.assert_allclose(np.asarray(dh), want[3], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(dv["w"]), 2 * want[4], rtol=1e-4, atol=1e-5)


def test_trained_head_on_several_devices_uses_one_chunk():
  """On a multi-device mesh a trained head's gradient would be all-reduced once per chunk (the
  loop carry): the step then runs the head in one chunk. A frozen head, or one device, keeps
  `loss_chunk`. Targets are gathered per row on a mesh (chunks stay spread over the batch
  shards), over the whole batch on one device."""
  import subprocess
  import sys
  code = """
import sys, jax, jax.numpy as jnp, numpy as np
from mllm_tune.models import build_model, param_shapes
from mllm_tune.models.config import CausalLMConfig, LLMConfig
from mllm_tune.train import step as step_lib
import mllm_tune as mt
cfg = CausalLMConfig(llm=LLMConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
    num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=64))
model = build_model(cfg)
params = jax.tree.map(lambda s: jnp.full(s.shape, 0.01, s.dtype), param_shapes(model))
seen = []
real = step_lib.chunked_token_ce
step_lib.chunked_token_ce = lambda *a, **k: seen.append((a[-1], k["per_row"])) or real(*a, **k)
ids = jnp.ones((2, 16), jnp.int32)
batch = {"input_ids": ids, "attention_mask": jnp.ones_like(ids), "loss_mask": jnp.ones_like(ids)}
for method in (mt.tuning.get("freeze", preset="full"), mt.tuning.get("lora", rank=2)):
  v = method.init_variables(jax.random.key(0), params)
  trainable, frozen = mt.tuning.partition(v, method.trainable(v))
  fns = step_lib.StepFns(model, method, None, loss_chunk=4)
  jax.eval_shape(jax.grad(lambda t: step_lib.micro_loss(fns, t, frozen, batch,
                                                        jax.random.key(0), 1.0, 1)[0]), trainable)
print("CHUNKS", seen)
"""
  got = {}
  for n in (1, 2):
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env=cpu_env(n))
    assert r.returncode == 0, r.stderr[-2000:]
    got[n] = r.stdout.strip().splitlines()[-1]
  # (full FT, LoRA); on a mesh each row's targets are gathered within the row
  assert got == {1: "CHUNKS [(4, False), (4, False)]", 2: "CHUNKS [(16, True), (4, True)]"}


def test_per_row_on_a_sharded_batch_equals_one_device():
  """Scattered targets, rows split over 2 devices (`per_row`, as the step runs on a mesh): the
  loss and gradients equal the unsharded computation, and the compiled step moves no hidden
  states between the devices (the whole-batch gathering would: the check sees it there)."""
  import subprocess
  import sys
  code = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from mllm_tune.losses.chunked import chunked_token_ce
rng = np.random.default_rng(0)
b, t, d, v = 4, 24, 8, 32
h = rng.normal(size=(b, t, d)).astype(np.float32)
w = rng.normal(size=(d, v)).astype(np.float32)
ids = rng.integers(0, v, (b, t)).astype(np.int32)
mask = (rng.random((b, t)) < 0.3).astype(np.int32)
mask[1] = 0
head = lambda x, hv: x @ hv
f = lambda per_row: jax.jit(jax.value_and_grad(
    lambda h_, w_: chunked_token_ce(head, w_, h_, ids, mask, 4, per_row)[0], argnums=(0, 1)))
want = f(False)(h, w)
mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
hs = jax.device_put(h, NamedSharding(mesh, P("data")))
got = f(True)(hs, w)
for a, e in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
  np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=1e-5, atol=1e-6)
import re
for per_row in (True, False):  # the grouped gather of one device would move hidden states
  hlo = f(per_row).lower(hs, w).compile().as_text()
  moved = re.findall(r"= f32\[\d+,\d+,%d\]\S* (?:all-reduce|all-gather|all-to-all|"
                     r"collective-permute|reduce-scatter)\(" % d, hlo)
  print("MOVED", per_row, len(moved) > 0)
"""
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                     env=cpu_env(2))
  assert r.returncode == 0, r.stderr[-2000:]
  assert r.stdout.strip().splitlines()[-2:] == ["MOVED True False", "MOVED False True"]
