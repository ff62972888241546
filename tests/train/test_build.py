"""`train/build.py`: the run construction the Trainer and the benchmark's `fit` share, checked
against the pieces written out by hand (partition, optimizer chain, step) and on what it must
refuse; LLaVA batches are cut into samples for per-sample scores."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mllm_tune as mt
from mllm_tune.importance import fisher
from mllm_tune.losses.token import token_ce
from mllm_tune.models import build_model, init_params
from mllm_tune.models.config import CausalLMConfig, LLMConfig
from mllm_tune.train import build
from mllm_tune.train.step import StepFns, TrainState, train_step
from mllm_tune.tuning.selective import grad_topk
from tests.helpers.tiny_models import IMAGE_TOKEN, tiny_llava


@pytest.fixture(scope="module")
def tiny():
  model = build_model(CausalLMConfig(llm=LLMConfig(
      vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
      num_kv_heads=2, head_dim=8, max_position_embeddings=64)))
  params = init_params(model, jax.random.key(0))
  rng = np.random.RandomState(0)
  ids = jnp.asarray(rng.randint(1, 64, size=(2, 12)), jnp.int32)
  batch = {"input_ids": ids, "attention_mask": jnp.ones_like(ids), "loss_mask": jnp.ones_like(ids)}
  return model, params, batch


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_assemble_runs_the_same_step_as_the_pieces_by_hand(tiny):
  model, params, batch = tiny
  method = mt.tuning.get("lora", rank=4, alpha=8, targets=r"llm/layers_\d+/attn/(q|v)_proj")
  variables = method.init_variables(jax.random.key(1), params)
  mask, n = build.trainable_mask(method, variables, log=False)
  assert n == 2 * ((32 * 4 + 4 * 32) + (32 * 4 + 4 * 16))  # 2 layers x (q: 32 out, v: 16 out)
  run = build.assemble(model, method, variables, mask, optax.adamw(1e-2),
                       master_dtype=jnp.float32, frozen_dtype=jnp.bfloat16)
  # the frozen base in bf16; the frozen LoRA scales keep float32 (2.0 here; a bf16 rsLoRA
  # scale 8/sqrt(3) would be 4.625 instead of 4.6188)
  assert {x.dtype for x in jax.tree.leaves(run.frozen["params"])} == {jnp.dtype(jnp.bfloat16)}
  assert {x.dtype for x in jax.tree.leaves(run.frozen["adapters"])} == {jnp.dtype(jnp.float32)}
  trainable, frozen = mt.tuning.partition(variables, mask)
  frozen = {**frozen, "params": jax.tree.map(lambda x: x.astype(jnp.bfloat16), frozen["params"])}
  opt = mt.tuning.build_optimizer(method, variables, mask, trainable, optax.adamw(1e-2))
  by_hand = StepFns(model, method, opt)
  outs = []
  for fns, tr, fr, o in ((run.fns, run.trainable, run.frozen, run.optimizer),
                         (by_hand, trainable, frozen, opt)):
    state = TrainState(jnp.int32(0), tr, o.init(tr), jax.random.key(2))
    for _ in range(2):
      state, metrics = jax.jit(functools.partial(train_step, fns))(fr, state, batch)
    outs.append((state.trainable, float(metrics["loss"])))
  assert outs[0][1] == outs[1][1]
  for a, b in zip(_leaves(outs[0][0]), _leaves(outs[1][0])):
    np.testing.assert_array_equal(a, b)


def test_prepare_method_scores_grad_topk_on_the_given_batches_only_when_needed(tiny):
  model, params, batch = tiny
  lora = mt.tuning.get("lora", rank=2, alpha=2, targets=r"llm/layers_\d+/attn/q_proj")
  assert not build.needs_preparing(lora)
  assert build.prepare_method(lora, model, {"params": params}, iter(())) is lora
  topk = mt.tuning.get("grad_topk", density=0.05, targets=r"llm/layers_\d+/mlp/.*")
  assert build.needs_preparing(topk)
  variables = topk.init_variables(jax.random.key(0), params)
  prepared = build.prepare_method(topk, model, variables, [batch, batch])
  assert not build.needs_preparing(prepared)

  def mean_nll(v, b):  # the trainer's loss, written out
    nll, n, _ = token_ce(model.apply(v, b["input_ids"]), b["input_ids"], b["loss_mask"])
    return nll / jnp.maximum(n, 1.0)
  want = topk.prepare(mean_nll, variables, [batch, batch])
  got_m, want_m = prepared.trainable(variables), want.trainable(variables)
  for a, b in zip(_leaves(got_m), _leaves(want_m)):
    np.testing.assert_array_equal(a, b)


def test_a_method_that_trains_nothing_is_refused_with_or_without_the_table(tiny):
  _, params, _ = tiny
  method = mt.tuning.get("lora", rank=2, alpha=2, targets=r"llm/layers_\d+/attn/q_proj")
  variables = method.init_variables(jax.random.key(0), params)
  frozen_all = mt.tuning.get("freeze", preset="full")
  mask = jax.tree.map(lambda x: False, frozen_all.trainable(variables))

  class Nothing:
    name = "nothing"
    trainable = staticmethod(lambda v: mask)
  for log in (True, False):
    with pytest.raises(mt.tuning.MethodError, match="trains nothing"):
      build.trainable_mask(Nothing(), variables, log=log)


def test_prepare_method_cuts_llava_batches_into_samples_with_their_own_images():
  """Image slots are shared across a batch's rows: grad_topk's per-sample scores are taken on
  the samples (`sample_batches`), and with the summed NLL they are the empirical Fisher of
  `importance.fisher` on the same batch (checked there against a per-sample loop)."""
  model, params, _ = tiny_llava()
  per = model.config.image_seq_len
  rng = np.random.RandomState(1)
  a = np.r_[1, [IMAGE_TOKEN] * per, rng.randint(2, 60, 4)]          # 1 image
  b = np.r_[1, rng.randint(2, 60, 5)]                               # text only
  c = np.r_[1, [IMAGE_TOKEN] * per, 7, [IMAGE_TOKEN] * per, 8, 9]   # 2 images
  t = 2 * per + 12
  ids, seg = np.zeros((2, t), np.int32), np.zeros((2, t), np.int32)
  ids[0, :len(a)], ids[0, len(a):len(a) + len(b)] = a, b            # row 0 packs a and b
  seg[0, :len(a)], seg[0, len(a):len(a) + len(b)] = 1, 2
  ids[1, :len(c)], seg[1, :len(c)] = c, 1
  pos = np.concatenate([np.arange(len(a)), np.arange(t - len(a))])
  batch = {"input_ids": ids, "attention_mask": (seg > 0).astype(np.int32), "segment_ids": seg,
           "positions": np.stack([pos, np.arange(t)]).astype(np.int32),
           "loss_mask": ((seg > 0) & (ids != IMAGE_TOKEN)).astype(np.int32),
           "pixel_values": rng.randn(3, 28, 28, 3).astype(np.float32)}  # 3 images, 2 rows
  variables = {"params": params, "adapters": {}}
  topk = mt.tuning.get("grad_topk", density=0.1, targets=r"llm/layers_\d+/attn/q_proj/kernel|"
                                                         r"projector/linear_1/kernel")
  cands = topk.candidates(variables)
  samples = build.sample_batches(model, [batch])
  assert samples[0]["pixel_values"].shape == (3, 2, 28, 28, 3)      # a, b, c with their own
  got = grad_topk.importance_scores(build.nll_loss(model, per_token=False), variables, samples,
                                    cands)
  want, n = fisher.fisher_from_batches(model, variables, cands, [batch], chunk=3)
  assert n == 3 and sorted(got) == sorted(want)
  for p in got:
    np.testing.assert_allclose(got[p], np.asarray(want[p]), rtol=1e-5,
                               atol=1e-6 * float(np.max(want[p])), err_msg=p)
