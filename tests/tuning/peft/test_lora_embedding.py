"""LoRA on the token embedding (`llm/embed`; peft's `lora_embedding_A/B`) against peft on a tiny
LLaVA with an untied LM head: a peft-saved adapter (embedding + q_proj) imports with peft's logits,
the gradients of the embedding factors equal peft's (none through the pad id's lookup, as
torch's padding_idx), re-export writes peft's tensors byte for byte
(peft's copy of the base embedding aside) and loads in peft; identity at init, exact merge; the
same with DoRA (peft's `DoraEmbeddingLayer`, magnitude gradients too); a tied head, PiSSA on the
embedding, trainable tokens beside it and peft factors of the wrong kind or on another embedding
are refused."""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel

import mllm_tune as mt
from mllm_tune import pytree
from mllm_tune.tuning.peft import export_peft, import_peft
from mllm_tune.tuning.peft.format import write_adapter
from tests.helpers import hf_tiny
from tests.helpers.peft_ref import (adapter_tensors, ce_loss_jax, ce_loss_torch, hf_px,
                                    saved_peft, tiny_llava, torch_logits)

TARGETS = r".*language_model.*\.(embed_tokens|q_proj)"


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_peft_embedding_lora_imports_trains_and_exports_like_peft(tmp_path, use_dora):
  hf_model, model, params, batch, base_dir = tiny_llava(tmp_path)
  peft_dir = str(tmp_path / "peft")
  torch.manual_seed(0)
  # every factor (A of the embedding is 0) and DoRA magnitude random
  peft_model = saved_peft(hf_model, LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS,
                                               use_dora=use_dora), peft_dir, leaf="lora_")
  method, variables = import_peft(peft_dir, model, params)
  assert method.use_dora == use_dora
  assert ("llm/embed/dora_m" in pytree.flatten(variables["adapters"])) == use_dora
  assert method.targets == (r"llm/embed", r"llm/layers_0/attn/q_proj", r"llm/layers_1/attn/q_proj")
  ids, mask, px = batch
  real = mask.astype(bool)
  ours = np.asarray(model.apply(variables, ids, mask, pixel_values=px))
  np.testing.assert_allclose(ours[real], torch_logits(peft_model.eval(), batch)[real], atol=1e-4)

  # the embedding factors' gradients of the same loss, with the pad id (0, HF's padding_idx:
  # no gradient through its lookup) at a real position too
  ids_pad = ids.copy()
  ids_pad[0, 1] = 0
  assert model.config.llm.pad_token_id == 0 and mask[0, 1]
  peft_model.train()
  out = peft_model(input_ids=torch.tensor(ids_pad), attention_mask=torch.tensor(mask),
                   pixel_values=hf_px(px), position_ids=torch.tensor(hf_tiny.positions(mask)))
  ce_loss_torch(out.logits, ids_pad, mask).backward()
  grads = {n: p.grad.numpy() for n, p in peft_model.named_parameters() if p.grad is not None}
  (ga,), (gb,) = ([g for n, g in grads.items() if f"embed_tokens.lora_embedding_{x}" in n]
                  for x in "AB")
  flat = pytree.flatten(variables)
  leaves = ("lora_a", "lora_b") + (("dora_m",) if use_dora else ())

  def loss(*xs):
    f = {**flat, **{f"adapters/llm/embed/{k}": x for k, x in zip(leaves, xs)}}
    return ce_loss_jax(model.apply(pytree.unflatten(f), ids_pad, mask, pixel_values=px), ids_pad,
                       mask)
  ours_g = jax.grad(loss, argnums=tuple(range(len(leaves))))(
      *[flat[f"adapters/llm/embed/{k}"] for k in leaves])
  assert np.abs(ga).max() > 1e-4 and np.abs(gb).max() > 1e-4 and not np.any(ga[:, 0])
  np.testing.assert_allclose(np.asarray(ours_g[0]), ga.T, atol=1e-5, rtol=1e-4)
  np.testing.assert_allclose(np.asarray(ours_g[1]), gb.T, atol=1e-5, rtol=1e-4)
  if use_dora:
    (gm,) = [g for n, g in grads.items() if "embed_tokens.lora_magnitude_vector" in n]
    assert np.abs(gm).max() > 1e-4
    np.testing.assert_allclose(np.asarray(ours_g[2]), gm, atol=1e-5, rtol=1e-4)

  again = str(tmp_path / "again")
  export_peft(again, model, method, variables, base_model_name_or_path=base_dir)
  saved, written = adapter_tensors(peft_dir), adapter_tensors(again)
  copies = {k for k in saved if ".base_layer." in k}  # peft's copy of the base embedding
  assert copies == {"base_model.model.model.language_model.embed_tokens.base_layer.weight"}
  assert sorted(set(saved) - copies) == sorted(written)
  for k, v in written.items():
    assert v.tobytes() == saved[k].tobytes(), k
  loaded = PeftModel.from_pretrained(hf_tiny.clip_llama(), again).eval()
  np.testing.assert_allclose(torch_logits(loaded, batch)[real], ours[real], atol=1e-4)

  merged = method.merge(variables)
  np.testing.assert_allclose(np.asarray(model.apply({"params": merged}, ids, mask,
                                                    pixel_values=px)), ours, atol=2e-5)


def test_embedding_lora_is_the_identity_at_init_and_refused_where_it_cannot_run(tmp_path):
  _, model, params, (ids, mask, px), _ = tiny_llava(tmp_path)
  method = mt.tuning.get("lora", rank=4, targets=r"llm/embed")
  variables = method.init_variables(jax.random.key(0), params)
  flat = pytree.flatten(variables)
  assert not np.any(flat["adapters/llm/embed/lora_a"])  # peft's init: A = 0, B ~ N(0, 1)
  assert 0.5 < float(jnp.std(flat["adapters/llm/embed/lora_b"])) < 2.0
  np.testing.assert_array_equal(np.asarray(model.apply(variables, ids, mask, pixel_values=px)),
                                np.asarray(model.apply({"params": params}, ids, mask,
                                                       pixel_values=px)))
  trained = {p for p, m in pytree.flatten(method.trainable(variables)).items() if np.any(m)}
  assert trained == {"adapters/llm/embed/lora_a", "adapters/llm/embed/lora_b"}
  with pytest.raises(mt.tuning.MethodError, match="only LoRA, rsLoRA and DoRA adapt it"):
    mt.tuning.get("pissa", rank=2, targets=r"llm/embed").init_variables(jax.random.key(0),
                                                                         params)
  # DoRA: the magnitude starts at the norms of the table's columns, so init is the identity too
  dora = mt.tuning.get("dora", rank=4, targets=r"llm/embed").init_variables(jax.random.key(0),
                                                                           params)
  np.testing.assert_allclose(
      np.asarray(dora["adapters"]["llm"]["embed"]["dora_m"]),
      np.linalg.norm(np.asarray(params["llm"]["embed"]["embedding"], np.float64), axis=0),
      rtol=1e-6)
  np.testing.assert_allclose(np.asarray(model.apply(dora, ids, mask, pixel_values=px)),
                             np.asarray(model.apply({"params": params}, ids, mask,
                                                    pixel_values=px)), rtol=1e-5, atol=1e-6)
  dora_method = mt.tuning.get("dora", rank=4, targets=r"llm/embed")
  assert {p for p, m in pytree.flatten(dora_method.trainable(dora)).items() if np.any(m)} == {
      "adapters/llm/embed/lora_a", "adapters/llm/embed/lora_b", "adapters/llm/embed/dora_m"}
  both = mt.tuning.compose(method, mt.tuning.get("trainable_tokens", token_indices=(5,)))
  both_vars = both.init_variables(jax.random.key(0), params)
  with pytest.raises(mt.tuning.MethodError, match="trainable_tokens beside LoRA on the token "
                                                  "embedding"):
    both.trainable(both_vars)
  with pytest.raises(ValueError, match="both LoRA factors and trainable token rows"):
    model.apply(both_vars, ids, mask, pixel_values=px)
  # peft factors of the wrong kind, or LoRA on another embedding, are refused by name
  config = {"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": "x"}
  embed = "base_model.model.model.language_model.embed_tokens"
  pos = "base_model.model.model.vision_tower.vision_model.embeddings.position_embedding"
  for tensors, match in (
      ({f"{embed}.lora_A.weight": np.zeros((2, 100)), f"{embed}.lora_B.weight": np.zeros((32, 2))},
       "lora_embedding_A/B and those of a Linear"),
      ({f"{pos}.lora_embedding_A": np.zeros((2, 5)), f"{pos}.lora_embedding_B": np.zeros((32, 2))},
       "is LoRA on the embedding layer .*position_embedding")):
    d = str(tmp_path / f"bad{len(match)}")
    write_adapter(d, config, tensors)
    with pytest.raises(mt.tuning.MethodError, match=match):
      import_peft(d, model, params)
  # a broad pattern without `embed` keeps meaning the Linear modules
  broad = mt.tuning.get("lora", rank=2, targets=r"llm/.*").init_variables(jax.random.key(0),
                                                                          params)
  assert "embed" not in broad["adapters"]["llm"]

  hf_tied = hf_tiny.siglip_qwen2()
  hf_tied.save_pretrained(str(tmp_path / "tied"))
  _, tied_params = mt.load_pretrained(str(tmp_path / "tied"))
  with pytest.raises(mt.tuning.MethodError, match="ties its LM head to it"):
    method.init_variables(jax.random.key(0), tied_params)
