"""Training a tiny Qwen3-VL-MoE from LLaVA JSON: one packed batch of the data pipeline, one jitted
step per kind of trainable set (LoRA on attention and per expert, the experts and router only, a
parallel adapter beside the experts, full fine-tuning), the router load-balancing term, and EWC with
the model's per-sample Fisher: exactly the intended leaves move, frozen entries stay bit-identical,
and the step's loss is the float64 NumPy token cross-entropy of the model's logits on the packed
batch (the logits themselves are checked against transformers in tests/models/)."""
from __future__ import annotations

import jax
import numpy as np
import pytest

import mllm_tune as mt
from mllm_tune import pytree
from tests.helpers import qwen_vl_tiny as qt
from tests.helpers.method_steps import changed, check_penalty, importance, packed_env, train
from tests.helpers.tiny_models import assert_masked_entries_fixed

EXPERTS = r"llm/layers_\d+/mlp/(router/kernel|experts_gate_up|experts_down)"


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
  root = tmp_path_factory.mktemp("qwen3_moe")
  d, _, _ = qt.model_dir(str(root), "qwen3_vl_moe")
  env = packed_env(root, d)
  assert env.model.config.llm.num_experts == 6
  assert int(env.batch["segment_ids"].max()) >= 2
  return env


def test_lora_on_attention_and_experts_steps_on_packed_moe_batches(moe):
  """LoRA on q / v and per expert on both expert stacks (their factors under the stacks'
  names): exactly the LoRA factors train, and step 1 moves the B factors only (A B = 0)."""
  method = mt.tuning.get("lora", rank=2,
                         targets=r"llm/layers_\d+/(attn/(q|v)_proj|mlp/experts_(gate_up|down))")
  _, before, mask, (after,), (metrics,) = train(moe, method)
  assert np.isfinite(metrics["loss"]) and metrics["loss"] > 0
  modules = ["attn/q_proj", "attn/v_proj", "mlp/experts_gate_up", "mlp/experts_down"]
  trained = {p for p, m in pytree.flatten(mask).items() if pytree.mask_any(m)}
  assert trained == {f"adapters/llm/layers/{m}/lora_{ab}" for m in modules for ab in "ab"}
  assert pytree.flatten(before)["adapters/llm/layers/mlp/experts_down/lora_a"].shape == (
      3, 6, 24, 2)  # (L, E, F, r)
  assert_masked_entries_fixed(before, after, mask)
  assert changed(before, after) == {f"adapters/llm/layers/{m}/lora_b" for m in modules}


def test_parallel_adapter_wraps_the_mixture_of_experts(moe):
  """The parallel adapter finds a MoE layer's FFN by its `experts_down` and trains beside it."""
  method = mt.tuning.get("parallel_adapter", bottleneck=4)
  _, before, mask, (after,), (metrics,) = train(moe, method)
  trained = {p for p, m in pytree.flatten(mask).items() if pytree.mask_any(m)}
  assert trained and all(p.startswith("adapters/llm/layers/mlp/") for p in trained), trained
  assert np.isfinite(metrics["loss"]) and changed(before, after) <= trained
  assert_masked_entries_fixed(before, after, mask)


def test_full_fine_tuning_moves_every_kind_of_leaf_and_its_loss_is_the_token_ce(moe):
  _, before, mask, (after,), (metrics,) = train(moe, mt.tuning.get("freeze", preset="full"))
  assert {"params/llm/layers/mlp/experts_gate_up", "params/llm/layers/mlp/router/kernel",
          "params/vision/pos_embed"} <= changed(before, after)
  # step 1's loss is the base model's CE over the packed batch's target tokens
  b = {k: np.asarray(v) for k, v in moe.batch.items()}
  logits = np.asarray(moe.logits(moe.params, moe.batch), np.float64)
  tgt, lm = np.roll(b["input_ids"], -1, 1), np.roll(b["loss_mask"], -1, 1) > 0
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1,
                         keepdims=True)) - logits.max(-1, keepdims=True)
  want = -np.take_along_axis(logp, tgt[..., None], -1)[..., 0][lm].mean()
  np.testing.assert_allclose(metrics["ce"], want, rtol=1e-5)


def test_ewc_with_the_per_sample_fisher_of_a_moe_model(moe):
  """The empirical Fisher vmaps per-sample gradients through the expert dispatch (shared
  weights, `grouped_matmul`'s vmap rules); EWC with it: 0 at theta0, then the
  Fisher-weighted float64 distance of step 1's merged weights (`check_penalty`)."""
  imp = importance(moe, ("empirical",))
  check_penalty(moe, imp, "ewc")


def test_model_tailor_refuses_changed_experts(moe):
  """Model Tailor patches Linear kernels (attention here); changed expert weights are refused
  with the leaf named, not silently kept at their fine-tuned values."""
  layers = moe.params["llm"]["layers"]
  ft = {**moe.params, "llm": {**moe.params["llm"], "layers": {**layers, "mlp": {
      **layers["mlp"], "experts_down": layers["mlp"]["experts_down"] + 0.01}}}}
  with pytest.raises(mt.tuning.MethodError,
                     match="'llm/layers/mlp/experts_down' differs from the base"):
    mt.tuning.get("model_tailor").tailor(moe.model, moe.params, ft, [moe.batch])


def test_expert_only_step_with_the_router_aux_loss_as_a_logged_term(moe):
  """Training the experts and router only, with `train.router_aux_loss` c: the step adds c x the
  load-balancing loss of the batch's router statistics (the base model's at step 1; checked against
  transformers in tests/models/) and logs it; a dense model refuses the option."""
  import optax
  from mllm_tune.losses.router import router_balance_loss
  from mllm_tune.models import model_kwargs
  from mllm_tune.train import build
  from tests.helpers.method_steps import compiled_step
  from tests.helpers.tiny_models import tiny_llava
  method = mt.tuning.get("freeze", targets=EXPERTS)
  variables = method.init_variables(jax.random.key(1), moe.params)
  mask, _ = build.trainable_mask(method, variables, log=False)
  run = build.assemble(moe.model, method, variables, mask, optax.adam(1e-2),
                       router_aux_loss=0.01)
  step, state = compiled_step(run, moe.batch)
  state, m = step(state, moe.batch, None, None)
  # the experts and router only: exactly those move
  after = mt.tuning.combine(state.trainable, run.frozen)
  trained = {p for p, x in pytree.flatten(mask).items() if pytree.mask_any(x)}
  assert trained == {"params/llm/layers/mlp/router/kernel",
                     "params/llm/layers/mlp/experts_gate_up", "params/llm/layers/mlp/experts_down"}
  assert_masked_entries_fixed(variables, after, mask)
  assert changed(variables, after) == trained
  _, sown = jax.jit(lambda p, b: moe.model.apply({"params": p}, b["input_ids"],
                                                 **model_kwargs(b), mutable=["intermediates"]))(
      moe.params, moe.batch)
  want = 0.01 * float(router_balance_loss(sown["intermediates"], moe.batch["attention_mask"]))
  np.testing.assert_allclose(float(m["loss_terms/router_aux"]), want, rtol=1e-5)
  np.testing.assert_allclose(float(m["loss"]), float(m["ce"]) + want, rtol=1e-5)
  # soft prompts (their own pass) are counted once per sample (tests/models/)
  prompt = mt.tuning.get("prompt_tuning", num_virtual_tokens=2)
  pv = prompt.init_variables(jax.random.key(0), moe.params)
  assert build.assemble(moe.model, prompt, pv, build.trainable_mask(prompt, pv, log=False)[0],
                        optax.adam(1e-2), router_aux_loss=0.01).fns.router_aux_loss == 0.01
  dense, params, _ = tiny_llava()
  freeze = mt.tuning.get("freeze")
  dv = freeze.init_variables(jax.random.key(0), params)
  with pytest.raises(ValueError, match="router_aux_loss=0.01: the model's LLM has no mixture"):
    build.assemble(dense, freeze, dv, build.trainable_mask(freeze, dv, log=False)[0],
                   optax.adam(1e-2), router_aux_loss=0.01)
