"""LoRA family vs peft: forward, export -> peft, peft -> import, one SGD step, merge."""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from transformers import LlavaForConditionalGeneration

import mllm_tune as mt
from mllm_tune.tuning.peft import export_peft, import_peft
from mllm_tune import pytree as select
from tests.helpers import hf_tiny
from tests.helpers.peft_ref import (ce_loss_jax, ce_loss_torch, hf_px, ours_logits, randomize,
                                    saved_peft, tiny_llava, torch_logits)

TARGETS = r"llm/layers_\d+/(attn/(q|v|o)_proj|mlp/down_proj)"
HF_TARGETS = r"model\.language_model\.layers\.\d+\.(self_attn\.(q|v|o)_proj|mlp\.down_proj)"
VARIANTS = {"lora": {}, "rslora": {"use_rslora": True}, "dora": {"use_dora": True}}


def _ours(name, params, **kw):
  method = mt.tuning.get(name, rank=4, alpha=6.0, targets=TARGETS, **kw)
  variables = method.init_variables(jax.random.key(0), params)
  variables["adapters"] = randomize(variables["adapters"], ("lora_b", "dora_m"), scale=0.2)
  if name == "dora":  # keep magnitudes near the weight norms
    variables["adapters"] = jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.abs(x) + 0.5 if p[-1].key == "dora_m" else x, variables["adapters"])
  return method, variables


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_export_loads_in_peft_with_same_logits(name, tmp_path):
  hf_model, model, params, batch, base_dir = tiny_llava(tmp_path)
  method, variables = _ours(name, params)
  out = str(tmp_path / "adapter")
  export_peft(out, model, method, variables, base_model_name_or_path=base_dir)
  with open(os.path.join(out, "adapter_config.json")) as f:
    cfg = json.load(f)
  assert cfg["peft_type"] == "LORA" and cfg["use_dora"] == (name == "dora")
  peft_model = PeftModel.from_pretrained(hf_model, out).eval()
  ref = torch_logits(peft_model, batch)
  ours = ours_logits(model, variables, batch)
  real = batch[1].astype(bool)
  np.testing.assert_allclose(ours[real], ref[real], atol=1e-4)
  base = ours_logits(model, {"params": params}, batch)
  assert np.abs(ours - base).max() > 1e-2  # the adapter really changes the output


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_peft_saved_adapter_imports_with_same_logits_and_bytes(name, tmp_path):
  hf_model, model, params, batch, _ = tiny_llava(tmp_path)
  peft_dir = str(tmp_path / "peft")
  peft_model = saved_peft(hf_model, LoraConfig(r=4, lora_alpha=6, target_modules=HF_TARGETS,
                                               **VARIANTS[name]), peft_dir)
  method, variables = import_peft(peft_dir, model, params)
  assert method.rank == 4 and method.use_dora == (name == "dora")
  ours = ours_logits(model, variables, batch)
  ref = torch_logits(peft_model.eval(), batch)
  real = batch[1].astype(bool)
  np.testing.assert_allclose(ours[real], ref[real], atol=1e-4)
  # exporting the imported adapter reproduces peft's tensors byte for byte
  again = str(tmp_path / "again")
  export_peft(again, model, method, variables)
  with safe_open(os.path.join(peft_dir, "adapter_model.safetensors"), "pt") as a, \
       safe_open(os.path.join(again, "adapter_model.safetensors"), "pt") as b:
    assert sorted(a.keys()) == sorted(b.keys())
    for k in a.keys():
      ta, tb = a.get_tensor(k), b.get_tensor(k)
      assert ta.dtype == tb.dtype and ta.numpy().tobytes() == tb.numpy().tobytes(), k


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_one_sgd_step_matches_peft_and_torch(name, tmp_path):
  hf_model, model, params, batch, _ = tiny_llava(tmp_path)
  ids, mask, px = batch
  method, variables = _ours(name, params)
  out = str(tmp_path / "adapter")
  export_peft(out, model, method, variables)
  peft_model = PeftModel.from_pretrained(hf_model, out, is_trainable=True).train()
  # ours: grads w.r.t. the trainable partition only, plain SGD
  mask_tree = method.trainable(variables)
  train, frozen = mt.tuning.partition(variables, mask_tree)
  assert "params" not in train  # base weights are not differentiated

  def loss_fn(tr):
    logits = model.apply(mt.tuning.combine(tr, frozen), ids, mask, pixel_values=px)
    return ce_loss_jax(logits, ids, mask)

  opt = mt.tuning.build_optimizer(method, variables, mask_tree, train, optax.sgd(0.5))
  grads = jax.grad(loss_fn)(train)
  updates, _ = opt.update(grads, opt.init(train), train)
  new = mt.tuning.combine(optax.apply_updates(train, updates), frozen)
  export_peft(str(tmp_path / "stepped"), model, method, new)
  # torch: the same step
  trainable = [p for p in peft_model.parameters() if p.requires_grad]
  sgd = torch.optim.SGD(trainable, lr=0.5)
  logits = peft_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                      pixel_values=hf_px(px),
                      position_ids=torch.tensor(hf_tiny.positions(mask))).logits
  ce_loss_torch(logits, ids, mask).backward()
  sgd.step()
  state = {k: v for k, v in peft_model.state_dict().items() if "lora_" in k}
  with safe_open(os.path.join(tmp_path, "stepped", "adapter_model.safetensors"), "pt") as f:
    assert len(f.keys()) == len(state)
    for k in f.keys():
      torch_key = k.replace(".lora_A.weight", ".lora_A.default.weight").replace(
          ".lora_B.weight", ".lora_B.default.weight").replace(
          ".lora_magnitude_vector", ".lora_magnitude_vector.default.weight")
      np.testing.assert_allclose(f.get_tensor(k).numpy(), state[torch_key].detach().numpy(),
                                 atol=2e-5, err_msg=k)
  moved = select.flatten(new["adapters"])
  before = select.flatten(variables["adapters"])
  assert any(np.abs(np.asarray(moved[k]) - np.asarray(before[k])).max() > 1e-4
             for k in moved if k.endswith("lora_a"))


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_merge_then_save_pretrained_gives_unmerged_logits(name, tmp_path):
  hf_model, model, params, batch, _ = tiny_llava(tmp_path)
  method, variables = _ours(name, params)
  merged = method.merge(variables)
  out = str(tmp_path / "merged")
  mt.save_pretrained(out, model, merged)
  from transformers import LlavaForConditionalGeneration
  back = LlavaForConditionalGeneration.from_pretrained(out).eval()
  ids, mask, px = batch
  ref = hf_tiny.hf_logits(back, ids, mask, px)
  real = mask.astype(bool)
  np.testing.assert_allclose(ours_logits(model, variables, batch)[real], ref[real], atol=1e-4)


def test_lora_init_follows_peft_kaiming_bounds_and_counts():
  from mllm_tune.models import build_model, init_params
  from mllm_tune.models.config import CausalLMConfig, LLMConfig
  cfg = LLMConfig(vocab_size=64, hidden_size=256, intermediate_size=512, num_layers=4,
                  num_heads=4, num_kv_heads=2, head_dim=64)
  model = build_model(CausalLMConfig(llm=cfg))
  params = init_params(model, jax.random.key(0))
  method = mt.tuning.get("lora", rank=16, alpha=32, targets=r"llm/layers_[0-2]/attn/(q|v)_proj")
  v = method.init_variables(jax.random.key(1), params)
  a = np.asarray(v["adapters"]["llm"]["layers"]["attn"]["q_proj"]["lora_a"])
  assert a.shape == (4, 256, 16) and np.abs(a).max() <= 1 / 16
  np.testing.assert_allclose(a[:3].var(), (1 / 16) ** 2 / 3, rtol=0.05)  # U(-b, b): b^2/3
  assert (a[3] == 0).all()  # layer 3 not targeted
  assert (np.asarray(v["adapters"]["llm"]["layers"]["attn"]["q_proj"]["lora_b"]) == 0).all()
  mask = method.trainable(v)
  table, n, total = mt.tuning.trainable_table(v, mask)
  # docs/methods.md: sum over targeted layers of r (d_in + d_out); q: 256->256, v: 256->128
  assert n == 3 * 16 * ((256 + 256) + (256 + 128))
  assert "lora_a" in table and "lora_scale" not in table


def test_pissa_init_matches_peft_and_preserves_the_model(tmp_path):
  hf_model, model, params, batch, _ = tiny_llava(tmp_path)
  method = mt.tuning.get("pissa", rank=4, alpha=4.0, targets=TARGETS)
  v = method.init_variables(jax.random.key(0), params)
  np.testing.assert_allclose(ours_logits(model, v, batch), ours_logits(model, {"params": params},
                                                                       batch), atol=1e-5)
  peft_model = get_peft_model(hf_model, LoraConfig(r=4, lora_alpha=4, target_modules=HF_TARGETS,
                                                   init_lora_weights="pissa"))
  sd = peft_model.state_dict()
  key = "base_model.model.model.language_model.layers.1.self_attn.q_proj"
  a_t = sd[f"{key}.lora_A.default.weight"].numpy()
  b_t = sd[f"{key}.lora_B.default.weight"].numpy()
  res_t = sd[f"{key}.base_layer.weight"].numpy()
  ad = v["adapters"]["llm"]["layers"]["attn"]["q_proj"]
  np.testing.assert_allclose(np.asarray(ad["lora_a"][1]) @ np.asarray(ad["lora_b"][1]),
                             (b_t @ a_t).T, atol=1e-5)
  np.testing.assert_allclose(np.asarray(v["params"]["llm"]["layers"]["attn"]["q_proj"]
                                        ["kernel"][1]), res_t.T, atol=1e-5)


def test_pissa_exports_as_plain_lora_on_the_original_base(tmp_path):
  hf_model, model, params, batch, _ = tiny_llava(tmp_path)
  method = mt.tuning.get("pissa", rank=4, alpha=4.0, targets=TARGETS)
  v = method.init_variables(jax.random.key(0), params)
  # "train": move the factors away from their init
  v["adapters"] = jax.tree_util.tree_map_with_path(
      lambda p, x: x + 0.05 * jax.random.normal(jax.random.key(3), x.shape)
      if p[-1].key in ("lora_a", "lora_b") else x, v["adapters"])
  out = str(tmp_path / "pissa_as_lora")
  export_peft(out, model, method, v)
  with open(os.path.join(out, "adapter_config.json")) as f:
    cfg = json.load(f)
  assert cfg["r"] == 8 and cfg["lora_alpha"] == 8.0
  peft_model = PeftModel.from_pretrained(hf_model, out).eval()  # on the ORIGINAL base
  real = batch[1].astype(bool)
  ours = ours_logits(model, v, batch)  # adapters on the residual base
  np.testing.assert_allclose(ours[real], torch_logits(peft_model, batch)[real], atol=1e-4)
  assert np.abs(ours - ours_logits(model, {"params": params}, batch)).max() > 1e-3


@pytest.mark.parametrize("name,kw", [("pissa", dict(rank=4, alpha=4.0)),
                                     ("lorasculpt", dict(rank=4, alpha=8.0, dropout=0.0)),
                                     ("vera", dict(rank=8))])
def test_merge_of_other_reparameterizations_loads_in_transformers(name, kw, tmp_path):
  hf_model, model, params, batch, _ = tiny_llava(tmp_path)
  method = mt.tuning.get(name, targets=TARGETS, **kw)
  v = method.init_variables(jax.random.key(0), params)
  v["adapters"] = randomize(v["adapters"], ("lora_b", "vera_bvec"), scale=0.2)
  out = str(tmp_path / "merged")
  mt.save_pretrained(out, model, method.merge(v))
  from transformers import LlavaForConditionalGeneration
  back = LlavaForConditionalGeneration.from_pretrained(out).eval()
  ids, mask, px = batch
  real = mask.astype(bool)
  ours = ours_logits(model, v, batch)
  np.testing.assert_allclose(ours[real], hf_tiny.hf_logits(back, ids, mask, px)[real], atol=1e-4)
  assert np.abs(ours - ours_logits(model, {"params": params}, batch)).max() > 1e-3


def test_rank_and_alpha_patterns_import_and_export_with_peft_logits(tmp_path):
  """peft's per-module rank_pattern / alpha_pattern (resolved with peft's own suffix rule) both
  ways; the layer with the larger rank shares a stacked leaf with rank-4 layers (zero padded)."""
  hf_model, model, params, batch, base_dir = tiny_llava(tmp_path)
  peft_dir = str(tmp_path / "peft")
  peft_model = saved_peft(hf_model, LoraConfig(
      r=4, lora_alpha=6, target_modules=HF_TARGETS,
      rank_pattern={"layers.1.self_attn.q_proj": 8}, alpha_pattern={"v_proj": 3}), peft_dir)
  method, variables = import_peft(peft_dir, model, params)
  q = variables["adapters"]["llm"]["layers"]["attn"]["q_proj"]
  assert q["lora_a"].shape[-1] == 8 and not np.asarray(q["lora_a"][0, :, 4:]).any()
  real = batch[1].astype(bool)
  ours = ours_logits(model, variables, batch)
  np.testing.assert_allclose(ours[real], torch_logits(peft_model.eval(), batch)[real], atol=1e-4)
  again = str(tmp_path / "again")
  export_peft(again, model, method, variables)
  with open(os.path.join(again, "adapter_config.json")) as f:
    cfg = json.load(f)
  assert cfg["rank_pattern"] == {r"model\.language_model\.layers\.1\.self_attn\.q_proj": 8}
  assert set(cfg["alpha_pattern"].values()) == {3.0} and len(cfg["alpha_pattern"]) == 2
  fresh = LlavaForConditionalGeneration.from_pretrained(base_dir).eval()
  reloaded = PeftModel.from_pretrained(fresh, again).eval()
  np.testing.assert_allclose(ours[real], torch_logits(reloaded, batch)[real], atol=1e-4)


def test_our_rank_pattern_exports_and_trains_only_real_ranks(tmp_path):
  """A LoRA made here with per-module ranks/alphas loads in peft with our logits; the padding of
  the smaller-rank layers is masked: it never moves through AdamW steps (A's stays zero)."""
  hf_model, model, params, batch, _ = tiny_llava(tmp_path)
  ids, mask, px = batch
  method = mt.tuning.get("lora", rank=4, alpha=6.0, targets=TARGETS,
                         rank_pattern=((r"llm/layers_0/attn/q_proj", 2),
                                       (r"llm/layers_\d+/mlp/down_proj", 6)),
                         alpha_pattern=((r"llm/layers_1/.*", 2.0),))
  v = method.init_variables(jax.random.key(0), params)
  v["adapters"] = randomize(v["adapters"], ("lora_b",), scale=0.2)
  mask_tree = method.trainable(v)
  train, frozen = mt.tuning.partition(v, mask_tree)
  opt = mt.tuning.build_optimizer(method, v, mask_tree, train, optax.adamw(1e-2, weight_decay=0.1))
  state = opt.init(train)
  before = np.asarray(v["adapters"]["llm"]["layers"]["attn"]["q_proj"]["lora_b"])
  for _ in range(3):
    grads = jax.grad(lambda tr: ce_loss_jax(model.apply(mt.tuning.combine(tr, frozen), ids, mask,
                                                        pixel_values=px), ids, mask))(train)
    updates, state = opt.update(grads, state, train)
    train = optax.apply_updates(train, updates)
  v = mt.tuning.combine(train, frozen)
  q = v["adapters"]["llm"]["layers"]["attn"]["q_proj"]
  assert not np.asarray(q["lora_a"][0, :, 2:]).any()
  np.testing.assert_array_equal(np.asarray(q["lora_b"][0, 2:]), before[0, 2:])
  assert np.abs(np.asarray(q["lora_b"][0, :2]) - before[0, :2]).max() > 1e-4
  assert np.abs(np.asarray(q["lora_b"][1, 2:]) - before[1, 2:]).max() > 1e-4
  out = str(tmp_path / "adapter")
  export_peft(out, model, method, v)
  peft_model = PeftModel.from_pretrained(hf_model, out).eval()
  assert peft_model.base_model.model.model.language_model.layers[0].self_attn.q_proj.r[
      "default"] == 2
  real = mask.astype(bool)
  np.testing.assert_allclose(ours_logits(model, v, batch)[real],
                             torch_logits(peft_model, batch)[real], atol=1e-4)


def test_pissa_saved_without_conversion_rebuilds_peft_residual(tmp_path):
  """A PiSSA adapter saved plainly holds factors for peft's residual base (which stays in peft's
  model): importing it onto the original base rebuilds that residual, giving peft's logits."""
  hf_model, model, params, batch, _ = tiny_llava(tmp_path)
  peft_model = get_peft_model(hf_model, LoraConfig(r=4, lora_alpha=4, target_modules=HF_TARGETS,
                                                   init_lora_weights="pissa"))
  torch.manual_seed(0)
  with torch.no_grad():  # "training": move the factors away from their SVD init
    for n, p in peft_model.named_parameters():
      if "lora_" in n:
        p.add_(torch.randn_like(p) * 0.05)
  peft_dir = str(tmp_path / "peft")
  peft_model.save_pretrained(peft_dir)
  with open(os.path.join(peft_dir, "adapter_config.json")) as f:
    assert json.load(f)["init_lora_weights"] == "pissa"
  method, variables = import_peft(peft_dir, model, params)
  assert method.name == "pissa"
  real = batch[1].astype(bool)
  ours = ours_logits(model, variables, batch)
  np.testing.assert_allclose(ours[real], torch_logits(peft_model.eval(), batch)[real], atol=1e-4)
  # and it goes back out as plain LoRA on the original base, as peft's conversion would
  out = str(tmp_path / "converted")
  export_peft(out, model, method, variables)
  from transformers import LlavaForConditionalGeneration as Llava
  fresh = Llava.from_pretrained(str(tmp_path / "base")).eval()
  np.testing.assert_allclose(ours[real], torch_logits(PeftModel.from_pretrained(fresh, out).eval(),
                                                      batch)[real], atol=1e-4)


@pytest.mark.parametrize("init", ["pissa_niter_4", "olora"])
def test_base_rewriting_inits_that_cannot_be_rebuilt_are_refused(init, tmp_path):
  hf_model, model, params, _, _ = tiny_llava(tmp_path)
  peft_model = get_peft_model(hf_model, LoraConfig(r=4, lora_alpha=4, target_modules=HF_TARGETS,
                                                   init_lora_weights=init))
  peft_dir = str(tmp_path / "peft")
  peft_model.save_pretrained(peft_dir)
  with pytest.raises(mt.tuning.MethodError,
                     match="init_lora_weights.*path_initial_model_for_weight_conversion"):
    import_peft(peft_dir, model, params)


def test_lora_on_a_tied_lm_head_says_it_is_tied(tmp_path):
  hf_model = hf_tiny.siglip_qwen2()
  base = str(tmp_path / "base")
  hf_model.save_pretrained(base)
  model, params = mt.load_pretrained(base)
  peft_model = get_peft_model(hf_model, LoraConfig(r=4, target_modules=["lm_head"]))
  peft_dir = str(tmp_path / "peft")
  peft_model.save_pretrained(peft_dir)
  with pytest.raises(mt.tuning.MethodError, match="ties its LM head to the input embeddings"):
    import_peft(peft_dir, model, params)
  with pytest.raises(mt.tuning.MethodError, match="tied to the input embeddings"):
    mt.tuning.get("lora", targets=r"llm/lm_head").init_variables(jax.random.key(0), params)
