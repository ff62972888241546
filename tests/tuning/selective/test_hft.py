"""HFT (docs/methods.md §2.4): the draw is a pure function of the seed, half the block matrices
train at Llama-7B shapes (no 7B allocated), frozen matrices stay bit-identical, resampling redraws
and resets the moments of newly unfrozen entries."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

import mllm_tune as mt
from mllm_tune.models import CausalLMConfig, LLMConfig, build_model, param_shapes
from mllm_tune import pytree as select
from mllm_tune.tuning.selective.hft import ATTN, FFN, hft_selection
from tests.helpers.tiny_models import (SYNTHETIC_BATCH, assert_masked_entries_fixed,
                                       synthetic_loss, tiny_llava, train)


def test_selection_is_a_pure_function_of_the_seed_with_the_paper_structure():
  a, b, c = (hft_selection(s, 32) for s in (7, 7, 8))
  assert all(np.array_equal(a[k], b[k]) for k in a)
  assert any(not np.array_equal(a[k], c[k]) for k in a)
  attn = np.stack([np.asarray(a[f"attn/{n}"]) for n in ATTN], 1)   # (L, 4)
  ffn = np.stack([np.asarray(a[f"mlp/{n}"]) for n in FFN], 1)      # (L, 3)
  assert (attn.sum(1) == 2).all()                                  # 2 of 4 attention matrices
  assert sorted(ffn.sum(1).tolist()) == [1] * 16 + [2] * 16        # half the blocks 1 of 3
  assert bool(a["projector/linear_1"]) != bool(a["projector/linear_2"])
  # the method's mask reproduces the draw (a jitted redraw too)
  jitted = jax.jit(hft_selection, static_argnums=1)(7, 32)
  assert all(np.array_equal(a[k], jitted[k]) for k in a)


def test_half_of_the_block_matrices_train_at_llama_7b_shapes():
  model = build_model(CausalLMConfig(llm=LLMConfig()))  # Llama-7B: d 4096, d_ff 11008, L 32
  shapes = param_shapes(model)                           # ShapeDtypeStructs, nothing allocated
  variables = {"params": shapes, "adapters": {}}
  blocks = {p: int(np.prod(s.shape)) for p, s in select.flatten(shapes).items()
            if p.startswith("llm/layers/") and p.endswith("_proj/kernel")}
  total = sum(blocks.values())
  flat_shapes = select.flatten(shapes)

  def count(m, shape):  # (L, 1, 1) per-layer masks: trained layers x matrix size
    return int(np.prod(shape)) if m is True else (
        int(np.asarray(m).sum()) * int(np.prod(shape[1:])) if m is not False else 0)

  for seed in range(3):
    mask = select.flatten(mt.tuning.get("hft", seed=seed).trainable(variables)["params"])
    trained = sum(count(mask[p], flat_shapes[p].shape) for p in blocks)
    assert 0.4 <= trained / total <= 0.6
    others = [p for p in mask if p not in blocks]  # norms, embeddings, head (no projector)
    assert others and all(mask[p] is False for p in others)


def test_frozen_matrices_stay_bit_identical_after_steps():
  _, params, _ = tiny_llava()
  method = mt.tuning.get("hft", seed=4)
  variables = method.init_variables(jax.random.key(0), params)
  mask = method.trainable(variables)
  q = mask["params"]["llm"]["layers"]["attn"]["q_proj"]["kernel"]
  assert isinstance(q, np.ndarray) or isinstance(q, bool)
  proj = mask["params"]["projector"]
  assert (proj["linear_1"]["kernel"] is True) != (proj["linear_2"]["kernel"] is True)
  after, _, _ = train(method, variables, synthetic_loss, SYNTHETIC_BATCH,
                      optax.adamw(1e-2, weight_decay=0.1), 5)
  assert_masked_entries_fixed(variables, after, mask)


def test_resampling_redraws_and_resets_moments_of_newly_unfrozen_entries():
  every = 2
  method = mt.tuning.get("hft", seed=0, resample_every=every)
  params = {"llm": {"layers": {"attn": {n: {"kernel": jnp.ones((4, 3, 3))} for n in ATTN},
                               "mlp": {n: {"kernel": jnp.ones((4, 3, 3))} for n in FFN}}}}
  variables = {"params": params, "adapters": {}}
  mask = method.trainable(variables)
  assert all(m is True for m in jax.tree.leaves(mask["params"]))  # union of every draw
  opt = method.transform(variables, optax.adam(0.1))
  trained = {"params": params}
  state = opt.init(trained)
  rng = np.random.RandomState(0)
  stage_masks = [method.stage_masks(method.candidate_shapes(params), 4, s) for s in range(3)]
  assert any(not np.array_equal(stage_masks[0][k], stage_masks[1][k]) for k in stage_masks[0])
  for step in range(3 * every):
    stage, m = step // every, stage_masks[step // every]
    grads = jax.tree.map(lambda x: jnp.asarray(rng.randn(*x.shape), jnp.float32), trained)
    updates, new_state = opt.update(grads, state, trained)
    flat_u, flat_g = select.flatten(updates), select.flatten(grads)
    mu_before = select.flatten(state.inner[0].mu)
    mu_after = select.flatten(new_state.inner[0].mu)
    for p, mk in m.items():
      mk = np.broadcast_to(np.asarray(mk), flat_u[p].shape)
      assert np.all(np.asarray(flat_u[p])[~mk] == 0), (step, p)  # frozen this stage
      assert np.all(np.asarray(flat_u[p])[mk] != 0), (step, p)
      if step % every == 0 and stage > 0:  # new stage: fresh entries restart from mu = 0
        prev = np.broadcast_to(np.asarray(stage_masks[stage - 1][p]), mk.shape)
        fresh = mk & ~prev
        np.testing.assert_allclose(np.asarray(mu_after[p])[fresh],
                                   0.1 * np.asarray(flat_g[p])[fresh], rtol=1e-6)
        kept = mk & prev
        np.testing.assert_allclose(np.asarray(mu_after[p])[kept],
                                   0.9 * np.asarray(mu_before[p])[kept]
                                   + 0.1 * np.asarray(flat_g[p])[kept], rtol=1e-5)
    trained, state = optax.apply_updates(trained, updates), new_state


def test_qwen_mergers_half_and_full():
  """Qwen's merger (ln_q + linear_1 + linear_2) and Qwen3-VL's deepstack mergers: `half` draws
  one of the main merger's linears and keeps the norm and deepstack mergers frozen; `full`
  trains every connector leaf (shapes only, no model built)."""
  lin = {"kernel": jnp.zeros((8, 8)), "bias": jnp.zeros((8,))}
  merger = {"ln_q": {"scale": jnp.zeros((8,)), "bias": jnp.zeros((8,))}, "linear_1": lin,
            "linear_2": lin}
  _, params, _ = tiny_llava()
  params = {**params, "projector": {**merger, "deepstack_0": merger}}
  variables = {"params": params, "adapters": {}}
  for resample in (None, 5):
    half = select.flatten(mt.tuning.get("hft", seed=1, resample_every=resample).trainable(
        variables)["params"])
    drawn = {p for p in half if p.startswith("projector/") and half[p] is True}
    assert drawn and all(p.startswith("projector/linear_") for p in drawn)
    if resample is None:  # one draw: one of the two linears (kernel and bias)
      assert len({p.split("/")[1] for p in drawn}) == 1
  full = select.flatten(mt.tuning.get("hft", projector="full").trainable(variables)["params"])
  assert all(full[p] is True for p in full if p.startswith("projector/"))
