"""LayerNorm tuning vs peft LN_TUNING (docs/methods.md §2.3, 4.7): same base + same weights -> same
logits, our export loads in peft, a peft-saved adapter imports, one SGD step equals peft+torch."""
from __future__ import annotations

import json
import os
import re

import jax
import numpy as np
import optax
import pytest
import torch
from peft import LNTuningConfig, PeftModel, get_peft_model
from safetensors import safe_open

import mllm_tune as mt
import mllm_tune.tuning.selective.by_path  # noqa: F401  (registers ln_tuning)
import mllm_tune.tuning.peft.ln_tuning  # noqa: F401  (PEFT LN_TUNING export/import)
from mllm_tune.tuning.peft import export_peft, import_peft
from mllm_tune import pytree as select
from tests.helpers import hf_tiny
from tests.helpers.peft_ref import (ce_loss_jax, ce_loss_torch, hf_px, ours_logits, tiny_llava,
                                    torch_logits)


def _ours(params, preset="ln_only", seed=0):
  """ln_tuning variables with the trained leaves randomized (so they differ from the base)."""
  method = mt.tuning.get("ln_tuning", preset=preset)
  variables = method.init_variables(jax.random.key(0), params)
  mask = select.flatten(method.trainable(variables)["params"])
  rng = np.random.RandomState(seed)
  flat = select.flatten(variables["params"])
  for p, m in mask.items():
    if m is True:
      flat[p] = flat[p] + rng.randn(*np.shape(flat[p])).astype(np.float32) * 0.2
  variables["params"] = select.unflatten(flat)
  return method, variables


@pytest.mark.parametrize("preset", ["ln_only", "ln_paper"])
def test_export_loads_in_peft_with_same_logits(preset, tmp_path):
  hf_model, model, params, batch, base_dir = tiny_llava(tmp_path)
  method, variables = _ours(params, preset)
  out = str(tmp_path / "adapter")
  export_peft(out, model, method, variables, base_model_name_or_path=base_dir)
  with open(os.path.join(out, "adapter_config.json")) as f:
    assert json.load(f)["peft_type"] == "LN_TUNING"
  with safe_open(os.path.join(out, "adapter_model.safetensors"), "pt") as f:
    keys = sorted(f.keys())
  n_layers = model.config.llm.num_layers
  n_norm = 2 * n_layers + 1
  # ln_paper adds the projector's 2 x (weight, bias), the embeddings and the LM head
  assert len(keys) == (n_norm if preset == "ln_only" else n_norm + 4 + 2)
  assert all(".ln_tuning_layers." in k for k in keys)
  peft_model = PeftModel.from_pretrained(hf_model, out).eval()
  ref = torch_logits(peft_model, batch)
  ours = ours_logits(model, variables, batch)
  real = batch[1].astype(bool)
  np.testing.assert_allclose(ours[real], ref[real], atol=1e-4)
  assert np.abs(ours - ours_logits(model, {"params": params}, batch)).max() > 1e-2


def test_peft_default_llava_adapter_imports_with_same_logits_and_bytes(tmp_path):
  """peft's own llava default targets (whole projector, embeddings with base_layer copies)."""
  hf_model, model, params, batch, _ = tiny_llava(tmp_path)
  peft_model = get_peft_model(hf_model, LNTuningConfig(task_type="CAUSAL_LM"))
  torch.manual_seed(0)
  with torch.no_grad():
    for n, p in peft_model.named_parameters():
      if "ln_tuning_layers" in n:
        p.add_(torch.randn_like(p) * 0.2)
  peft_dir = str(tmp_path / "peft")
  peft_model.save_pretrained(peft_dir)
  method, variables = import_peft(peft_dir, model, params)
  assert method.preset == "ln_paper" and not method.targets
  ref = torch_logits(peft_model.eval(), batch)
  ours = ours_logits(model, variables, batch)
  real = batch[1].astype(bool)
  np.testing.assert_allclose(ours[real], ref[real], atol=1e-4)
  # re-exporting writes the same tensors (per-Linear projector keys instead of peft's nesting)
  again = str(tmp_path / "again")
  export_peft(again, model, method, variables)
  with safe_open(os.path.join(peft_dir, "adapter_model.safetensors"), "pt") as a, \
       safe_open(os.path.join(again, "adapter_model.safetensors"), "pt") as b:
    ours_keys = set(b.keys())
    for k in a.keys():
      if ".base_layer." in k:
        assert k not in ours_keys
        continue
      k2 = re.sub(r"multi_modal_projector\.ln_tuning_layers\.default\.(linear_\d)\.(\w+)$",
                  r"multi_modal_projector.\1.ln_tuning_layers.\2", k)
      assert a.get_tensor(k).numpy().tobytes() == b.get_tensor(k2).numpy().tobytes(), k


def test_peft_ln_only_adapter_roundtrips_byte_identical(tmp_path):
  hf_model, model, params, batch, _ = tiny_llava(tmp_path)
  cfg = LNTuningConfig(task_type="CAUSAL_LM",
                       target_modules=["input_layernorm", "post_attention_layernorm", "norm"])
  peft_model = get_peft_model(hf_model, cfg)
  torch.manual_seed(1)
  with torch.no_grad():
    for n, p in peft_model.named_parameters():
      if "ln_tuning_layers" in n:
        p.add_(torch.randn_like(p) * 0.2)
  peft_dir = str(tmp_path / "peft")
  peft_model.save_pretrained(peft_dir)
  method, variables = import_peft(peft_dir, model, params)
  assert method.preset == "ln_only"
  np.testing.assert_allclose(ours_logits(model, variables, batch)[batch[1].astype(bool)],
                             torch_logits(peft_model.eval(), batch)[batch[1].astype(bool)],
                             atol=1e-4)
  again = str(tmp_path / "again")
  export_peft(again, model, method, variables)
  with safe_open(os.path.join(peft_dir, "adapter_model.safetensors"), "pt") as a, \
       safe_open(os.path.join(again, "adapter_model.safetensors"), "pt") as b:
    assert sorted(a.keys()) == sorted(b.keys())
    for k in a.keys():
      assert a.get_tensor(k).numpy().tobytes() == b.get_tensor(k).numpy().tobytes(), k


def test_one_sgd_step_matches_peft_and_torch(tmp_path):
  hf_model, model, params, batch, _ = tiny_llava(tmp_path)
  ids, mask, px = batch
  method, variables = _ours(params, "ln_only")
  out = str(tmp_path / "adapter")
  export_peft(out, model, method, variables)
  peft_model = PeftModel.from_pretrained(hf_model, out, is_trainable=True).train()
  mask_tree = method.trainable(variables)
  train, frozen = mt.tuning.partition(variables, mask_tree)
  assert set(select.flatten(train)) == {"params/llm/layers/input_norm/scale",
                                        "params/llm/layers/post_attn_norm/scale",
                                        "params/llm/final_norm/scale"}

  def loss_fn(tr):
    logits = model.apply(mt.tuning.combine(tr, frozen), ids, mask, pixel_values=px)
    return ce_loss_jax(logits, ids, mask)

  opt = mt.tuning.build_optimizer(method, variables, mask_tree, train, optax.sgd(0.5))
  updates, _ = opt.update(jax.grad(loss_fn)(train), opt.init(train), train)
  stepped = mt.tuning.combine(optax.apply_updates(train, updates), frozen)
  export_peft(str(tmp_path / "stepped"), model, method, stepped)
  trainable = [p for p in peft_model.parameters() if p.requires_grad]
  assert sum(p.numel() for p in trainable) == mt.tuning.trainable_table(variables, mask_tree)[1]
  sgd = torch.optim.SGD(trainable, lr=0.5)
  logits = peft_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                      pixel_values=hf_px(px),
                      position_ids=torch.tensor(hf_tiny.positions(mask))).logits
  ce_loss_torch(logits, ids, mask).backward()
  sgd.step()
  state = {k.replace(".ln_tuning_layers.default.", ".ln_tuning_layers."): v
           for k, v in peft_model.state_dict().items() if "ln_tuning_layers" in k}
  moved = 0.0
  with safe_open(os.path.join(tmp_path, "stepped", "adapter_model.safetensors"), "pt") as f:
    assert len(f.keys()) == len(state)
    for k in f.keys():
      np.testing.assert_allclose(f.get_tensor(k).numpy(), state[k].detach().numpy(), atol=2e-5,
                                 err_msg=k)
  for k in ("input_norm", "post_attn_norm"):
    moved = max(moved, float(np.abs(np.asarray(stepped["params"]["llm"]["layers"][k]["scale"])
                                    - np.asarray(variables["params"]["llm"]["layers"][k]
                                                 ["scale"])).max()))
  assert moved > 1e-4
