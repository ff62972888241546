"""peft's `lora_bias=True` (lora_B with a bias b; the layer gets s * b more) against peft on a tiny
LLaVA, on the vision tower's q_proj (which has a bias) and the LLM's (which has none): a
peft-saved adapter imports with peft's logits and peft's gradient of b, re-export writes peft's
tensors byte for byte and loads in peft, a merge equals peft's merged bias and the unmerged
function, and a merge into a layer without a bias, DoRA / PiSSA / the embedding with lora_bias,
and a bias tensor the config does not announce are refused."""
from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel

import mllm_tune as mt
from mllm_tune import pytree
from mllm_tune.tuning.api import MethodError
from mllm_tune.tuning.peft import export_peft, import_peft
from tests.helpers import hf_tiny
from tests.helpers.peft_ref import (adapter_tensors, ce_loss_jax, ce_loss_torch, hf_px,
                                    randomize, saved_peft, tiny_llava, torch_logits)

TARGETS = r".*(vision_tower|language_model).*\.q_proj"
VISION_Q = "base_model.model.model.vision_tower.encoder.layers.0.self_attn.q_proj"


def test_peft_lora_bias_imports_trains_exports_and_merges_like_peft(tmp_path):
  hf_model, model, params, batch, base_dir = tiny_llava(tmp_path)
  peft_dir = str(tmp_path / "peft")
  peft_model = saved_peft(hf_model, LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS,
                                               lora_bias=True), peft_dir)  # B and b random
  saved = adapter_tensors(peft_dir)
  assert f"{VISION_Q}.lora_B.bias" in saved and np.abs(saved[f"{VISION_Q}.lora_B.bias"]).max() > 0
  method, variables = import_peft(peft_dir, model, params)
  assert method.lora_bias
  ids, mask, px = batch
  real = mask.astype(bool)
  ours = np.asarray(model.apply(variables, ids, mask, pixel_values=px))
  np.testing.assert_allclose(ours[real], torch_logits(peft_model.eval(), batch)[real], atol=1e-4)

  # the gradient of b, LLM and vision tower, equals peft's
  out = peft_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                   pixel_values=hf_px(px), position_ids=torch.tensor(hf_tiny.positions(mask)))
  ce_loss_torch(out.logits, ids, mask).backward()
  # (a layer whose output nothing reads, the vision tower's last one, gets no grad: zero)
  theirs = {n: np.zeros(tuple(p.shape), np.float32) if p.grad is None else p.grad.numpy()
            for n, p in peft_model.named_parameters() if "lora_B" in n and n.endswith(".bias")}
  flat = pytree.flatten(variables)
  keys = sorted(k for k in flat if k.endswith("/lora_bias"))
  assert keys == ["adapters/llm/layers/attn/q_proj/lora_bias",
                  "adapters/vision/layers/attn/q_proj/lora_bias"]
  trained = pytree.flatten(method.trainable(variables))
  assert all(np.all(trained[k]) for k in keys)  # b is trained

  def loss(biases):
    f = {**flat, **dict(zip(keys, biases))}
    return ce_loss_jax(model.apply(pytree.unflatten(f), ids, mask, pixel_values=px), ids, mask)
  grads = jax.grad(loss)([flat[k] for k in keys])
  for k, g in zip(keys, grads):
    tower = "language_model" if k.startswith("adapters/llm") else "vision_tower"
    for i in range(g.shape[0]):
      name = [n for n in theirs if tower in n and f"layers.{i}." in n]
      assert len(name) == 1, (k, i, list(theirs))
      np.testing.assert_allclose(np.asarray(g[i]), theirs[name[0]], atol=1e-6, rtol=1e-4)
    assert np.abs(np.asarray(g)).max() > 1e-4

  again = str(tmp_path / "again")
  export_peft(again, model, method, variables, base_model_name_or_path=base_dir)
  written = adapter_tensors(again)
  assert sorted(written) == sorted(saved)
  for k, v in written.items():
    assert v.tobytes() == saved[k].tobytes(), k
  with open(os.path.join(again, "adapter_config.json")) as f:
    assert json.load(f)["lora_bias"] is True
  loaded = PeftModel.from_pretrained(hf_tiny.clip_llama(), again).eval()
  np.testing.assert_allclose(torch_logits(loaded, batch)[real], ours[real], atol=1e-4)

  # merging: the LLM's q_proj has no bias to take s * b (peft refuses it too)
  with pytest.raises(MethodError, match="has no bias to merge it into"):
    method.merge(variables)


def test_merge_adds_s_b_to_the_base_bias_as_peft_does(tmp_path):
  hf_model, model, params, batch, _ = tiny_llava(tmp_path)
  vision_only = r".*vision_tower.*\.q_proj"
  peft_model = saved_peft(hf_model, LoraConfig(r=2, lora_alpha=4, target_modules=vision_only,
                                               lora_bias=True), str(tmp_path / "peft"))
  method, variables = import_peft(str(tmp_path / "peft"), model, params)
  merged = method.merge(variables)
  ids, mask, px = batch
  real = mask.astype(bool)
  with_adapters = np.asarray(model.apply(variables, ids, mask, pixel_values=px))
  plain = np.asarray(model.apply({"params": merged, "adapters": {}}, ids, mask, pixel_values=px))
  np.testing.assert_allclose(plain[real], with_adapters[real], atol=2e-5)
  hf_merged = peft_model.merge_and_unload()
  for i in range(len(hf_merged.model.vision_tower.encoder.layers)):
    want = hf_merged.model.vision_tower.encoder.layers[i].self_attn.q_proj.bias
    np.testing.assert_allclose(np.asarray(merged["vision"]["layers"]["attn"]["q_proj"]["bias"][i]),
                               want.detach().numpy(), atol=1e-6)


def test_lora_bias_is_refused_where_peft_has_none(tmp_path):
  _, model, params, _, _ = tiny_llava(tmp_path)
  for kw in (dict(use_dora=True), dict()):
    name = "lora" if kw else "pissa"
    with pytest.raises(MethodError, match="lora_bias is supported for plain LoRA / rsLoRA"):
      mt.tuning.get(name, lora_bias=True, **kw)
  with pytest.raises(MethodError, match="lora_bias applies to Linear targets"):
    mt.tuning.get("lora", lora_bias=True, targets=("llm/embed", r"llm/layers_\d+/attn/q_proj")
                  ).init_variables(jax.random.key(0), params)
  # a bias tensor the config does not announce
  peft_dir = str(tmp_path / "peft")
  saved_peft(hf_tiny.clip_llama(), LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS,
                                              lora_bias=True), peft_dir)
  cfg_path = os.path.join(peft_dir, "adapter_config.json")
  with open(cfg_path) as f:
    cfg = json.load(f)
  cfg["lora_bias"] = False
  with open(cfg_path, "w") as f:
    json.dump(cfg, f)
  with pytest.raises(MethodError, match="has lora_B.bias but the config does not set lora_bias"):
    import_peft(peft_dir, model, params)


def test_penalties_pull_b_into_the_bias_where_it_folds_and_toward_zero_where_it_cannot(tmp_path):
  """L2-SP on LoRA with lora_bias on the vision q_proj (with a bias: s b is part of the merged
  bias) and the LLM's (none: b is an adapter leaf no merge folds, pulled to 0 by beta): the
  merged view still holds the kernels, and the value equals float64 NumPy."""
  from mllm_tune import penalties
  _, model, params, _, _ = tiny_llava(tmp_path)
  method = mt.tuning.get("lora", rank=2, alpha=4, lora_bias=True,
                         targets=(r"llm/layers_\d+/attn/q_proj", r"vision/layers_\d+/attn/q_proj"))
  variables = method.init_variables(jax.random.key(0), params)
  variables["adapters"] = randomize(variables["adapters"], ("lora_a", "lora_b", "lora_bias"))
  bound, consts = penalties.bind(penalties.get("l2sp", weight=0.1, beta=0.01), method, variables)
  assert bound.merged
  assert set(bound.weighted) == {"params/llm/layers/attn/q_proj/kernel",
                                 "params/vision/layers/attn/q_proj/kernel",
                                 "params/vision/layers/attn/q_proj/bias"}
  assert bound.free == ("adapters/llm/layers/attn/q_proj/lora_bias",)
  trainable, frozen = mt.tuning.partition(variables, method.trainable(variables))
  ad = {p: np.asarray(x, np.float64) for p, x in pytree.flatten(variables["adapters"]).items()}
  want = 0.0
  for tower in ("llm", "vision"):
    a, b = ad[f"{tower}/layers/attn/q_proj/lora_a"], ad[f"{tower}/layers/attn/q_proj/lora_b"]
    s = ad[f"{tower}/layers/attn/q_proj/lora_scale"][:, None, None]
    want += 0.1 / 2 * np.sum((s * a @ b) ** 2)
  s_v = ad["vision/layers/attn/q_proj/lora_scale"][:, None]
  want += 0.1 / 2 * np.sum((s_v * ad["vision/layers/attn/q_proj/lora_bias"]) ** 2)
  want += 0.01 / 2 * np.sum(ad["llm/layers/attn/q_proj/lora_bias"] ** 2)
  np.testing.assert_allclose(float(bound.value(trainable, frozen, consts)), want, rtol=1e-5)
