"""AdamW's weight decay follows transformers Trainer's rule by default (`optimizer.decay_on`
hf_trainer): the leaves we decay, written to an HF checkpoint and read back by transformers, are
exactly `Trainer.get_decay_parameter_names` of the same model (CLIP + Llama and SigLIP + Qwen2
LLaVAs; Qwen2.5-VL but for its vision RMSNorms, which we spare); one AdamW step with zero
gradients shrinks exactly those leaves (adapter biases and norms of a LoRA / LN-tuning run
spared), `decay_on=all` shrinks every leaf, and the optimizer state is optax.adamw's."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from transformers import Trainer

import mllm_tune as mt
from mllm_tune import pytree
from mllm_tune.train import setup
from tests.helpers import hf_tiny


def _qwen2_5_vl():
  from tests.helpers import qwen_vl_tiny
  return qwen_vl_tiny.qwen2_5_vl()


@pytest.mark.parametrize("make", [hf_tiny.clip_llama, hf_tiny.siglip_qwen2, _qwen2_5_vl])
def test_decayed_leaves_are_transformers_trainers(make, tmp_path):
  hf_model = make()
  base = str(tmp_path / "base")
  hf_model.save_pretrained(base)
  model, params = mt.load_pretrained(base)
  marks = pytree.unflatten({p: jnp.full(np.shape(x), float(setup.decays("params/" + p)),
                                        jnp.float32)
                            for p, x in pytree.flatten(params).items()})
  out = str(tmp_path / "marks")
  mt.save_pretrained(out, model, marks)
  back = type(hf_model).from_pretrained(out, dtype=torch_float32())
  ours, mixed = set(), []
  for name, p in back.named_parameters():
    values = set(np.unique(p.detach().numpy()).tolist())
    if values not in ({0.0}, {1.0}):
      mixed.append(name)
    elif values == {1.0}:
      ours.add(name)
  assert not mixed
  # the names Trainer puts in its decay group (`create_optimizer` keeps named_parameters in it;
  # the rule also lists unset torch attention slots and a tied head's second name)
  theirs = set(Trainer.get_decay_parameter_names(None, hf_model)) & {
      n for n, _ in hf_model.named_parameters()}
  # [choice] every normalization weight is spared; Trainer's name rule decays the RMSNorms of
  # Qwen2.5-VL's vision blocks and merger, whose names spell no "norm" it knows
  rms = {n for n in theirs if n.startswith("model.visual.") and any(
      k in n for k in (".norm1.", ".norm2.", ".ln_q."))}
  assert bool(rms) == (make is _qwen2_5_vl)
  assert ours == theirs - rms, (sorted(ours - theirs), sorted(theirs - ours))
  assert any("bias" in n for n, _ in back.named_parameters()) and any(
      "norm" in n for n, _ in back.named_parameters())


def torch_float32():
  import torch
  return torch.float32


@pytest.mark.parametrize("decay_on", ["hf_trainer", "all"])
def test_one_adamw_step_decays_exactly_those_leaves(decay_on, tmp_path):
  hf_model = hf_tiny.clip_llama()
  base = str(tmp_path / "base")
  hf_model.save_pretrained(base)
  _, params = mt.load_pretrained(base)
  method = mt.tuning.compose(
      mt.tuning.get("lora", rank=2, lora_bias=True, targets=r"vision/layers_\d+/attn/q_proj"),
      mt.tuning.get("ln_tuning"), mt.tuning.get("bitfit"))
  variables = method.init_variables(jax.random.key(0), params)
  trainable, _ = mt.tuning.partition(variables, method.trainable(variables))
  trainable = jax.tree.map(lambda x: x + 0.5, trainable)  # no zero leaf (zero biases at init)
  o = ml_collections.ConfigDict(dict(name="adamw", learning_rate=0.1, schedule="constant",
                                     warmup_steps=0, weight_decay=0.5, decay_on=decay_on,
                                     b1=0.9, b2=0.999, eps=1e-8, momentum=0.0, clip_norm=0.0))
  opt, _ = setup.make_optimizer(o, 10)
  zero = jax.tree.map(jnp.zeros_like, trainable)
  updates, _ = opt.update(zero, opt.init(trainable), trainable)
  moved = {p: bool(np.any(np.asarray(u) != 0)) for p, u in pytree.flatten(updates).items()}
  flat = pytree.flatten(trainable)
  for p, u in pytree.flatten(updates).items():  # decoupled decay: -lr * wd * w
    want = -0.1 * 0.5 * np.asarray(flat[p]) if moved[p] else 0 * np.asarray(flat[p])
    np.testing.assert_allclose(np.asarray(u), want, rtol=1e-6, err_msg=p)
  spared = sorted(p for p, m in moved.items() if not m)
  if decay_on == "all":
    assert spared == []
  else:
    assert "adapters/vision/layers/attn/q_proj/lora_bias" in spared
    assert {"adapters/vision/layers/attn/q_proj/lora_a",
            "adapters/vision/layers/attn/q_proj/lora_b"} <= {p for p, m in moved.items() if m}
    assert spared and all("bias" in p or "norm" in p for p in spared)
    assert all("bias" not in p and "norm" not in p for p, m in moved.items() if m)


def test_an_unknown_decay_rule_is_refused():
  o = ml_collections.ConfigDict(dict(name="adamw", learning_rate=0.1, schedule="constant",
                                     warmup_steps=0, weight_decay=0.5, decay_on="some"))
  with pytest.raises(setup.ConfigValueError, match="optimizer.decay_on must be hf_trainer|all"):
    setup.make_optimizer(o, 10)


def test_the_optimizer_state_has_optax_adamws_structure_under_either_rule():
  """Checkpoints of runs with either rule (and of runs before it existed, plain optax.adamw)
  restore with the other: same state tree."""
  import optax
  t = {"params": {"w": jnp.ones((2, 3)), "bias": jnp.ones(3)}, "adapters": {}}
  o = ml_collections.ConfigDict(dict(name="adamw", learning_rate=0.1, schedule="constant",
                                     warmup_steps=0, weight_decay=0.5, decay_on="hf_trainer",
                                     b1=0.9, b2=0.999, eps=1e-8, momentum=0.0, clip_norm=0.0))
  want = jax.tree.structure(optax.adamw(optax.constant_schedule(0.1), weight_decay=0.5).init(t))
  for rule in ("hf_trainer", "all"):
    o.decay_on = rule
    assert jax.tree.structure(setup.make_optimizer(o, 10)[0].init(t)) == want
