"""VeRA vs peft: export -> peft, peft -> import, one SGD step, merge."""
from __future__ import annotations

import os

import jax
import numpy as np
import optax
import torch
from peft import PeftModel, VeraConfig
from safetensors import safe_open

import mllm_tune as mt
from mllm_tune.tuning.peft import export_peft, import_peft
from tests.helpers import hf_tiny
from tests.helpers.peft_ref import (ce_loss_jax, ce_loss_torch, hf_px, ours_logits, randomize,
                                    saved_peft, tiny_llava, torch_logits)

TARGETS = r"llm/layers_\d+/(attn/(q|v)_proj|mlp/(up|down)_proj)"  # mixed in/out widths
HF_TARGETS = r"model\.language_model\.layers\.\d+\.(self_attn\.(q|v)_proj|mlp\.(up|down)_proj)"


def _ours(params):
  method = mt.tuning.get("vera", rank=8, targets=TARGETS)
  v = method.init_variables(jax.random.key(0), params)
  v["adapters"] = randomize(v["adapters"], ("vera_bvec",), scale=0.5)
  return method, v


def test_vera_export_loads_in_peft_and_merges(tmp_path):
  hf_model, model, params, batch, _ = tiny_llava(tmp_path)
  method, v = _ours(params)
  out = str(tmp_path / "vera")
  export_peft(out, model, method, v)
  peft_model = PeftModel.from_pretrained(hf_model, out).eval()
  real = batch[1].astype(bool)
  ours = ours_logits(model, v, batch)
  np.testing.assert_allclose(ours[real], torch_logits(peft_model, batch)[real], atol=1e-4)
  assert np.abs(ours - ours_logits(model, {"params": params}, batch)).max() > 1e-2
  merged = {"params": method.merge(v)}
  np.testing.assert_allclose(ours_logits(model, merged, batch), ours, atol=1e-4)
  _, n, _ = mt.tuning.trainable_table(v, method.trainable(v))
  # sum over targets of (r + d_out): q 32, v 16, up 64, down 32 per layer, 2 layers
  assert n == 2 * ((8 + 32) + (8 + 16) + (8 + 64) + (8 + 32))


def test_peft_saved_vera_imports_and_one_sgd_step_matches(tmp_path):
  hf_model, model, params, batch, _ = tiny_llava(tmp_path)
  ids, mask, px = batch
  d = str(tmp_path / "peft")
  peft_model = saved_peft(hf_model, VeraConfig(r=8, target_modules=HF_TARGETS,
                                               save_projection=True), d, "vera_lambda_b", 0.5)
  method, v = import_peft(d, model, params)
  real = mask.astype(bool)
  np.testing.assert_allclose(ours_logits(model, v, batch)[real],
                             torch_logits(peft_model.eval(), batch)[real], atol=1e-4)
  # one SGD step on both sides
  mask_tree = method.trainable(v)
  train, frozen = mt.tuning.partition(v, mask_tree)
  loss = lambda tr: ce_loss_jax(model.apply(mt.tuning.combine(tr, frozen), ids, mask,
                                            pixel_values=px), ids, mask)
  opt = mt.tuning.build_optimizer(method, v, mask_tree, train, optax.sgd(0.5))
  upd, _ = opt.update(jax.grad(loss)(train), opt.init(train), train)
  new = mt.tuning.combine(optax.apply_updates(train, upd), frozen)
  export_peft(str(tmp_path / "ours_step"), model, method, new)
  peft_model.train()
  sgd = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.5)
  logits = peft_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                      pixel_values=hf_px(px),
                      position_ids=torch.tensor(hf_tiny.positions(mask))).logits
  ce_loss_torch(logits, ids, mask).backward()
  sgd.step()
  sd = peft_model.state_dict()
  with safe_open(os.path.join(tmp_path, "ours_step", "adapter_model.safetensors"), "pt") as f:
    keys = [k for k in f.keys() if "lambda" in k]
    assert keys
    for k in keys:
      tk = k.replace(".vera_lambda_d", ".vera_lambda_d.default").replace(
          ".vera_lambda_b", ".vera_lambda_b.default")
      np.testing.assert_allclose(f.get_tensor(k).numpy(), sd[tk].detach().numpy(), atol=2e-5,
                                 err_msg=k)
