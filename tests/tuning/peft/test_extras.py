"""What a peft LoRA adapter carries beside its factors (`tuning/peft/extras.py`): modules_to_save,
bias="all" / "lora_only" and the base-layer copy peft saves for a LoRA-wrapped LM head. Adapters
made by peft import with peft's logits; our compositions export to adapters peft loads with ours."""
from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

import mllm_tune as mt
from mllm_tune.tuning.peft import export_peft, import_peft
from mllm_tune import pytree
from tests.helpers.peft_ref import ours_logits, randomize, tiny_llava, torch_logits

LLM_QV = r"model\.language_model\.layers\.\d+\.self_attn\.(q|v)_proj"
PROJ_1 = r"model\.multi_modal_projector\.linear_1"


def _peft_saved(hf_model, tmp_path, **cfg):
  """A peft LoRA model with every trainable tensor moved off its init, saved plainly."""
  torch.manual_seed(0)
  peft_model = get_peft_model(hf_model, LoraConfig(r=4, lora_alpha=6, **cfg))
  with torch.no_grad():
    for _, p in peft_model.named_parameters():
      if p.requires_grad:
        p.add_(torch.randn_like(p) * 0.2)
  out = str(tmp_path / "peft")
  peft_model.save_pretrained(out)
  return peft_model.eval(), out


def _parity(ours, ref, batch):
  real = batch[1].astype(bool)
  np.testing.assert_allclose(ours[real], ref[real], atol=1e-4)


def _reexport_parity(tmp_path, model, method, variables, base_dir, batch):
  """Our export of `variables` loads in peft (on a fresh base) with our logits; -> its config."""
  from transformers import LlavaForConditionalGeneration
  again = str(tmp_path / "again")
  export_peft(again, model, method, variables, base_model_name_or_path=base_dir)
  fresh = LlavaForConditionalGeneration.from_pretrained(base_dir).eval()
  peft_model = PeftModel.from_pretrained(fresh, again).eval()
  _parity(ours_logits(model, variables, batch), torch_logits(peft_model, batch), batch)
  with open(os.path.join(again, "adapter_config.json")) as f:
    return json.load(f)


def test_modules_to_save_projector_imports_as_lora_plus_projector(tmp_path):
  hf_model, model, params, batch, base_dir = tiny_llava(tmp_path)
  peft_model, peft_dir = _peft_saved(hf_model, tmp_path, target_modules=LLM_QV,
                                     modules_to_save=["multi_modal_projector"])
  method, variables = import_peft(peft_dir, model, params)
  assert isinstance(method, mt.tuning.Compose)
  assert [m.name for m in method.methods] == ["lora", "freeze"]
  assert method.methods[1].preset == "projector"  # the LLaVA recipe's projector, recognised
  _parity(ours_logits(model, variables, batch), torch_logits(peft_model, batch), batch)
  cfg = _reexport_parity(tmp_path, model, method, variables, base_dir, batch)
  assert cfg["modules_to_save"] == ["model.multi_modal_projector.linear_1",
                                    "model.multi_modal_projector.linear_2"]
  assert cfg["bias"] == "none"


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_bias_modes_import_and_export_with_peft_logits(bias, tmp_path):
  hf_model, model, params, batch, base_dir = tiny_llava(tmp_path)
  peft_model, peft_dir = _peft_saved(hf_model, tmp_path, target_modules=f"{LLM_QV}|{PROJ_1}",
                                     bias=bias)
  method, variables = import_peft(peft_dir, model, params)
  assert [m.name for m in method.methods] == ["lora", "bitfit"]
  trained = pytree.flatten(method.trainable(variables)["params"])
  trained = sorted(p for p, m in trained.items() if np.any(m))
  if bias == "lora_only":  # the LLM has no biases: only the wrapped projector linear's
    assert trained == ["projector/linear_1/bias"]
  else:
    assert "vision/layers/norm1/bias" in trained and "projector/linear_2/bias" in trained
  _parity(ours_logits(model, variables, batch), torch_logits(peft_model, batch), batch)
  cfg = _reexport_parity(tmp_path, model, method, variables, base_dir, batch)
  assert cfg["bias"] == bias and cfg["modules_to_save"] is None


def test_our_lora_with_projector_and_biases_exports_for_peft(tmp_path):
  """The compositions PEFT can express, made here: LoRA + the projector trained in full, and
  LoRA + every bias (BitFit)."""
  _, model, params, batch, base_dir = tiny_llava(tmp_path)
  lora = mt.tuning.get("lora", rank=4, alpha=8.0, targets=r"llm/layers_\d+/attn/(q|v)_proj")
  cases = [(mt.tuning.get("freeze", preset="projector"), "modules_to_save"),
           (mt.tuning.get("bitfit"), "bias")]
  for i, (other, field) in enumerate(cases):
    method = mt.tuning.compose(lora, other)
    variables = method.init_variables(jax.random.key(0), params)
    variables["adapters"] = randomize(variables["adapters"], ("lora_b",), seed=i)
    flat = pytree.flatten(variables["params"])
    mask = pytree.flatten(method.trainable(variables)["params"])
    rng = np.random.RandomState(i)
    for p, m in mask.items():
      if np.any(m):
        flat[p] = flat[p] + rng.randn(*np.shape(flat[p])).astype(np.float32) * 0.2
    variables["params"] = pytree.unflatten(flat)
    sub = tmp_path / field
    sub.mkdir()
    cfg = _reexport_parity(sub, model, method, variables, base_dir, batch)
    if field == "bias":
      assert cfg["bias"] == "all" and cfg["modules_to_save"] is None
    else:
      assert cfg["bias"] == "none" and len(cfg["modules_to_save"]) == 2
    assert np.abs(ours_logits(model, variables, batch)
                  - ours_logits(model, {"params": params}, batch)).max() > 1e-2


def test_sparse_or_overlapping_compositions_are_refused(tmp_path):
  _, model, params, _, _ = tiny_llava(tmp_path)
  lora = mt.tuning.get("lora", rank=4, targets=r"projector/linear_1")
  method = mt.tuning.compose(lora, mt.tuning.get("freeze", targets=r"projector/linear_1/kernel"))
  variables = method.init_variables(jax.random.key(0), params)
  with pytest.raises(mt.tuning.MethodError, match="carry LoRA and are also trained in full"):
    export_peft(str(tmp_path / "x"), model, method, variables)


def test_lm_head_lora_with_peft_base_layer_copy_imports(tmp_path):
  """peft's default save of LoRA on lm_head adds `lm_head.base_layer.weight` (the unchanged base
  weight): skipped after checking it equals ours; a copy of another base is refused."""
  hf_model, model, params, batch, base_dir = tiny_llava(tmp_path)
  peft_model, peft_dir = _peft_saved(
      hf_model, tmp_path, target_modules=r"model\.language_model\.layers\.\d+\.self_attn\.q_proj"
      r"|lm_head")
  weights = os.path.join(peft_dir, "adapter_model.safetensors")
  saved = load_file(weights)
  assert "base_model.model.lm_head.base_layer.weight" in saved
  method, variables = import_peft(peft_dir, model, params)
  assert any("lm_head" in t for t in method.targets)
  _parity(ours_logits(model, variables, batch), torch_logits(peft_model, batch), batch)
  _reexport_parity(tmp_path, model, method, variables, base_dir, batch)
  saved["base_model.model.lm_head.base_layer.weight"] += 0.01
  save_file(saved, weights, metadata={"format": "pt"})
  with pytest.raises(mt.tuning.MethodError, match="copy of the base weight 'lm_head.weight'"):
    import_peft(peft_dir, model, params)
