"""Trainable tokens vs peft files (`tuning/peft/tokens.py`): a peft-saved TRAINABLE_TOKENS adapter
(tied and untied LM head) and a LoRA adapter with `trainable_token_indices` import with peft's
logits, re-export to the same tensors byte for byte, and our export loads in peft with our
logits; peft's dict form and base-weight copies import; PiSSA beside the tokens exports; token
indices naming another module, rows on an untied LM head and tokens beside a fully trained
embedding are refused."""
from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel, TrainableTokensConfig, get_peft_model

import mllm_tune as mt
from mllm_tune import pytree
from mllm_tune.tuning.peft import export_peft, import_peft
from mllm_tune.tuning.peft import tokens as peft_tokens
from mllm_tune.tuning.peft.format import write_adapter
from tests.helpers import hf_tiny
from tests.helpers.peft_ref import adapter_tensors, hf_px, token_llava

TOKENS = [5, 20, 23, 60]


def _setup(tmp_path, tied: bool):
  return token_llava(tmp_path, tied)


def _peft_saved(hf_model, config, out: str):
  """peft model with its trained tensors (rows, lora_B) randomized, saved to `out`."""
  peft_model = get_peft_model(hf_model, config)
  torch.manual_seed(0)
  with torch.no_grad():
    for n, p in peft_model.named_parameters():
      if "trainable_tokens_delta" in n or "lora_B" in n:
        p.add_(torch.randn_like(p) * 0.3)
  peft_model.save_pretrained(out)
  return peft_model.eval()


def _logits(peft_model, batch):
  ids, mask, px = batch
  with torch.no_grad():
    out = peft_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                     pixel_values=hf_px(px), position_ids=torch.tensor(hf_tiny.positions(mask)))
  return out.logits.numpy()


def _roundtrip(tmp_path, hf_model, model, params, batch, base_dir, config, want_method):
  peft_dir = str(tmp_path / "peft")
  peft_model = _peft_saved(hf_model, config, peft_dir)
  method, variables = import_peft(peft_dir, model, params)
  assert method == want_method
  ids, mask, px = batch
  ours = np.asarray(model.apply(variables, ids, mask, pixel_values=px))
  ref = _logits(peft_model, batch)
  real = mask.astype(bool)
  np.testing.assert_allclose(ours[real], ref[real], atol=1e-4)
  base = np.asarray(model.apply({"params": params}, ids, mask, pixel_values=px))
  assert np.abs(ours - base).max() > 1e-2
  again = str(tmp_path / "again")
  export_peft(again, model, method, variables, base_model_name_or_path=base_dir)
  saved, written = adapter_tensors(peft_dir), adapter_tensors(again)
  assert sorted(saved) == sorted(written)
  for k, v in saved.items():
    assert v.tobytes() == written[k].tobytes(), k
  fresh = hf_tiny.siglip_qwen2() if model.config.llm.tie_word_embeddings else hf_tiny.clip_llama()
  loaded = PeftModel.from_pretrained(fresh, again).eval()
  np.testing.assert_allclose(_logits(loaded, batch)[real], ours[real], atol=1e-4)
  return peft_dir


@pytest.mark.parametrize("tied", [False, True])
def test_trainable_tokens_adapter_both_ways(tmp_path, tied):
  hf_model, model, params, batch, base_dir = _setup(tmp_path, tied)
  want = mt.tuning.get("trainable_tokens", token_indices=tuple(TOKENS))
  _roundtrip(tmp_path, hf_model, model, params, batch, base_dir,
             TrainableTokensConfig(token_indices=TOKENS), want)


def test_lora_with_trainable_token_indices_both_ways_and_refusals(tmp_path):
  hf_model, model, params, batch, base_dir = _setup(tmp_path, False)
  want = mt.tuning.compose(
      mt.tuning.get("lora", rank=2, alpha=4.0, dropout=0.0,
                    targets=(r"llm/layers_0/attn/q_proj", r"llm/layers_0/attn/v_proj",
                             r"llm/layers_1/attn/q_proj", r"llm/layers_1/attn/v_proj")),
      mt.tuning.get("trainable_tokens", token_indices=tuple(TOKENS)))
  peft_dir = _roundtrip(tmp_path, hf_model, model, params, batch, base_dir,
                        LoraConfig(r=2, lora_alpha=4,
                                   target_modules=r".*language_model.*\.(q_proj|v_proj)",
                                   trainable_token_indices=TOKENS), want)
  cfg_file = os.path.join(peft_dir, "adapter_config.json")
  with open(cfg_file) as f:
    config = json.load(f)
  config["trainable_token_indices"] = {"lm_head": TOKENS}
  with open(cfg_file, "w") as f:
    json.dump(config, f)
  with pytest.raises(mt.tuning.MethodError, match=r"'trainable_token_indices' = \{\"lm_head\".* "
                                                  r"names modules other than the input embedding"):
    import_peft(peft_dir, model, params)

  method = mt.tuning.get("trainable_tokens", token_indices=tuple(TOKENS))
  variables = method.init_variables(None, params)
  config, tensors = peft_tokens.export_trainable_tokens(method, model, variables)
  rows = next(iter(tensors.values()))
  head_dir = str(tmp_path / "untied_head")
  write_adapter(head_dir, config, {**tensors, "base_model.model.lm_head.trainable_tokens_delta":
                                   rows})
  with pytest.raises(mt.tuning.MethodError, match=r"trains rows of an untied LM head"):
    import_peft(head_dir, model, params)


def test_what_peft_also_writes_imports_and_what_it_cannot_load_is_refused(tmp_path):
  """peft's dict form of the indices with the tied head's entry, and its base-weight copies
  (`save_embedding_layers=True`), import with peft's logits; PiSSA + trainable tokens exports
  (as LoRA on the original base) and loads in peft; tokens beside an embedding trained in full
  are refused at export."""
  hf_model, model, params, batch, base_dir = _setup(tmp_path, True)
  peft_model = get_peft_model(hf_model, LoraConfig(
      r=2, lora_alpha=4, target_modules=r".*language_model.*\.q_proj",
      trainable_token_indices={"embed_tokens": TOKENS, "lm_head": TOKENS}))
  torch.manual_seed(0)
  with torch.no_grad():
    for n, p in peft_model.named_parameters():
      if "trainable_tokens_delta" in n or "lora_B" in n:
        p.add_(torch.randn_like(p) * 0.3)
  peft_dir = str(tmp_path / "peft")
  peft_model.save_pretrained(peft_dir, save_embedding_layers=True)
  assert any(k.endswith("token_adapter.base_layer.weight") for k in adapter_tensors(peft_dir))
  method, variables = import_peft(peft_dir, model, params)
  ids, mask, px = batch
  real = mask.astype(bool)
  np.testing.assert_allclose(np.asarray(model.apply(variables, ids, mask, pixel_values=px))[real],
                             _logits(peft_model.eval(), batch)[real], atol=1e-4)

  _, model, params, batch, base_dir = _setup(tmp_path / "untied", False)
  tokens = mt.tuning.get("trainable_tokens", token_indices=np.asarray(TOKENS))  # numpy ids
  pissa = mt.tuning.compose(mt.tuning.get("pissa", rank=2, targets=r"llm/layers_\d+/attn/q_proj"),
                            tokens)
  variables = pissa.init_variables(jax.random.key(0), params)
  flat = pytree.flatten(variables)
  flat["adapters/llm/embed/token_rows"] = flat["adapters/llm/embed/token_rows"] + 0.3
  flat["adapters/llm/layers/attn/q_proj/lora_b"] = flat[
      "adapters/llm/layers/attn/q_proj/lora_b"] + 0.1
  variables = pytree.unflatten(flat)
  out = str(tmp_path / "pissa")
  export_peft(out, model, pissa, variables, base_model_name_or_path=base_dir)
  loaded = PeftModel.from_pretrained(hf_tiny.clip_llama(), out).eval()
  ids, mask, px = batch
  real = mask.astype(bool)
  np.testing.assert_allclose(_logits(loaded, batch)[real], np.asarray(
      model.apply(variables, ids, mask, pixel_values=px))[real], atol=1e-4)

  full = mt.tuning.compose(mt.tuning.get("lora", rank=2), tokens,
                           mt.tuning.get("freeze", targets=r"llm/embed/embedding"))
  with pytest.raises(mt.tuning.MethodError, match="is trained in full .modules_to_save. and has "
                                                  "trainable tokens"):
    export_peft(str(tmp_path / "full"), model, full,
                full.init_variables(jax.random.key(0), params))
