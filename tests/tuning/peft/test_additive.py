"""Additive methods PEFT has, against peft + transformers (float32, atol 1e-4): (IA)^3 on a tiny
LLaVA, prompt tuning, prefix tuning and LLaMA-Adapter on a bare tiny Llama (peft + HF Llava with
pixel_values is not a safe path; ADAPTION_PROMPT supports llama/mistral only), multimodal prompt
tuning against an explicit concatenation. Each: our export loads in peft with the same logits, a
peft-saved adapter imports with the same logits, one plain-SGD step moves the adapters as
peft + torch does."""
from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from peft import (AdaptionPromptConfig, IA3Config, PeftModel, PrefixTuningConfig,
                  PromptTuningConfig, get_peft_model, get_peft_model_state_dict)
from safetensors import safe_open

import mllm_tune as mt
import mllm_tune.tuning.additive  # noqa: F401  (registers the additive methods + PEFT io)
from mllm_tune.tuning.peft import export_peft, import_peft
from mllm_tune import pytree as select
from tests.helpers import hf_tiny
from tests.helpers.peft_ref import ce_loss_jax, ce_loss_torch, hf_px, randomize, tiny_llava

LR = 0.5
IA3_HF = r"model\.language_model\.layers\.\d+\.(self_attn\.(k|v)_proj|mlp\.down_proj)"
IA3_HF_FF = r"model\.language_model\.layers\.\d+\.mlp\.down_proj"


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def llama(tmp_path_factory):
  """(hf_model, model, params, (ids, mask, None), jitted apply) for a bare tiny Llama."""
  hf_model = hf_tiny.llama()
  d = str(tmp_path_factory.mktemp("llama"))
  hf_model.save_pretrained(d)
  model, params = mt.load_pretrained(d)
  ids, mask = hf_tiny.padded_batch([[1, 5, 6, 7, 8, 9, 10], [1, 20, 21, 22]], "right")
  return hf_model, model, params, (ids, mask, None), jax.jit(model.apply)


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
  hf_model, model, params, batch, _ = tiny_llava(tmp_path_factory.mktemp("llava"))
  return hf_model, model, params, batch, jax.jit(model.apply)


def ours(apply, variables, batch) -> np.ndarray:
  ids, mask, px = batch
  kw = {} if px is None else {"pixel_values": px}
  return np.asarray(apply(variables, ids, mask, **kw))


def torch_forward(peft_model, batch, n_virtual: int = 0):
  """Logits of the real tokens (peft prompt tuning returns the virtual positions too)."""
  ids, mask, px = batch
  kw = {} if px is None else {"pixel_values": hf_px(px)}
  out = peft_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                   position_ids=torch.tensor(hf_tiny.positions(mask)), **kw).logits
  return out[:, n_virtual:]


def assert_same_logits(ours_BTV, ref_BTV, mask):
  real = mask.astype(bool)
  np.testing.assert_allclose(ours_BTV[real], np.asarray(ref_BTV)[real], atol=1e-4)


def our_sgd_step(model, method, variables, batch):
  """One plain-SGD step on the trainable partition (grads w.r.t. it only)."""
  ids, mask, px = batch
  kw = {} if px is None else {"pixel_values": px}
  mask_tree = method.trainable(variables)
  train, frozen = mt.tuning.partition(variables, mask_tree)
  assert "params" not in train  # the base is not differentiated

  def loss_fn(tr):
    return ce_loss_jax(model.apply(mt.tuning.combine(tr, frozen), ids, mask, **kw), ids, mask)

  opt = mt.tuning.build_optimizer(method, variables, mask_tree, train, optax.sgd(LR))
  grads = jax.jit(jax.grad(loss_fn))(train)
  updates, _ = opt.update(grads, opt.init(train), train)
  return mt.tuning.combine(optax.apply_updates(train, updates), frozen)


def torch_sgd_step(peft_model, batch, n_virtual: int = 0):
  ids, mask, _ = batch
  peft_model.train()
  sgd = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=LR)
  ce_loss_torch(torch_forward(peft_model, batch, n_virtual), ids, mask).backward()
  sgd.step()


def trained(peft_model) -> dict[str, np.ndarray]:
  return {n: p.detach().numpy().copy() for n, p in peft_model.named_parameters()
          if p.requires_grad}


def saved_tensors(adapter_dir) -> dict[str, bytes]:
  with safe_open(f"{adapter_dir}/adapter_model.safetensors", "pt") as f:
    return {k: f.get_tensor(k).numpy().tobytes() for k in f.keys()}


def assert_keys_match_peft(adapter_dir, peft_model):
  """Our export holds exactly the tensors peft would save (no missing / unexpected keys)."""
  assert sorted(saved_tensors(adapter_dir)) == sorted(get_peft_model_state_dict(peft_model))


def assert_reexport_is_byte_identical(peft_dir, model, method, variables, tmp_path):
  """peft -> ours -> export reproduces peft's tensors byte for byte (docs/methods.md §4.7)."""
  export_peft(str(tmp_path / "again"), model, method, variables)
  assert saved_tensors(peft_dir) == saved_tensors(tmp_path / "again")


def assert_moved(before: dict, after: dict, name: str):
  delta = np.abs(np.asarray(select.flatten(after["adapters"])[name])
                 - np.asarray(select.flatten(before["adapters"])[name])).max()
  assert delta > 1e-4, f"{name} did not move"


# ----------------------------------------------------------------------------- (IA)^3
def _ia3(params):
  method = mt.tuning.get("ia3")
  v = method.init_variables(jax.random.key(0), params)
  return method, {**v, "adapters": jax.tree.map(lambda x: x + 0.6 * jnp.sin(
      jnp.arange(x.size, dtype=jnp.float32).reshape(x.shape)), v["adapters"])}


def test_ia3_export_loads_in_peft_and_sgd_step_matches(llava, tmp_path):
  hf_model, model, params, batch, apply = llava
  method, v = _ia3(params)
  out = str(tmp_path / "ia3")
  export_peft(out, model, method, v)
  peft_model = PeftModel.from_pretrained(copy.deepcopy(hf_model), out, is_trainable=True).eval()
  assert_keys_match_peft(out, peft_model)
  got = ours(apply, v, batch)
  with torch.no_grad():
    assert_same_logits(got, torch_forward(peft_model, batch), batch[1])
  assert np.abs(got - ours(apply, {"params": params}, batch)).max() > 1e-2
  new = our_sgd_step(model, method, v, batch)
  torch_sgd_step(peft_model, batch)
  state = trained(peft_model)
  ad = new["adapters"]["llm"]["layers"]
  for i in range(2):
    key = f"base_model.model.model.language_model.layers.{i}"
    for ours_leaf, peft_name in ((ad["attn"]["k_proj"]["ia3_out"][i], "self_attn.k_proj"),
                                 (ad["attn"]["v_proj"]["ia3_out"][i], "self_attn.v_proj"),
                                 (ad["mlp"]["down_proj"]["ia3_in"][i], "mlp.down_proj")):
      np.testing.assert_allclose(np.asarray(ours_leaf),
                                 state[f"{key}.{peft_name}.ia3_l.default"].reshape(-1),
                                 atol=2e-5, err_msg=f"{key}.{peft_name}")
  assert_moved(v, new, "llm/layers/mlp/down_proj/ia3_in")


def test_ia3_peft_saved_adapter_imports_with_same_logits(llava, tmp_path):
  hf_model, model, params, batch, apply = llava
  peft_model = get_peft_model(copy.deepcopy(hf_model), IA3Config(
      target_modules=IA3_HF, feedforward_modules=IA3_HF_FF))
  with torch.no_grad():
    for n, p in peft_model.named_parameters():
      if "ia3_l" in n:
        p.uniform_(0.3, 1.7)
  peft_model.save_pretrained(str(tmp_path / "peft"))
  method, v = import_peft(str(tmp_path / "peft"), model, params)
  assert method.name == "ia3"
  with torch.no_grad():
    assert_same_logits(ours(apply, v, batch), torch_forward(peft_model.eval(), batch), batch[1])
  assert_reexport_is_byte_identical(tmp_path / "peft", model, method, v, tmp_path)


def test_ia3_merged_model_saves_and_loads_in_transformers(llava, tmp_path):
  _, model, params, batch, apply = llava
  method, v = _ia3(params)
  merged = method.merge(v)
  np.testing.assert_allclose(ours(apply, {"params": merged}, batch), ours(apply, v, batch),
                             atol=1e-4)
  mt.save_pretrained(str(tmp_path / "merged"), model, merged)
  from transformers import LlavaForConditionalGeneration
  back = LlavaForConditionalGeneration.from_pretrained(str(tmp_path / "merged")).eval()
  ids, mask, px = batch
  assert_same_logits(ours(apply, v, batch), hf_tiny.hf_logits(back, ids, mask, px), mask)


# ----------------------------------------------------------------------------- prompt tuning
def test_prompt_tuning_export_loads_in_peft_and_sgd_step_matches(llama, tmp_path):
  hf_model, model, params, batch, apply = llama
  method = mt.tuning.get("prompt_tuning", num_virtual_tokens=3)
  v = method.init_variables(jax.random.key(1), params)  # sampled vocab rows
  table = np.asarray(params["llm"]["embed"]["embedding"])
  assert all((table == row).all(1).any() for row in np.asarray(v["adapters"]["llm"]
                                                                ["prompt_embeddings"]))
  export_peft(str(tmp_path / "pt"), model, method, v)
  peft_model = PeftModel.from_pretrained(copy.deepcopy(hf_model), str(tmp_path / "pt")).eval()
  assert_keys_match_peft(tmp_path / "pt", peft_model)
  got = ours(apply, v, batch)
  assert got.shape[:2] == batch[0].shape  # logits drop the virtual positions
  with torch.no_grad():
    assert_same_logits(got, torch_forward(peft_model, batch, 3), batch[1])
  # peft cannot load prompt adapters as trainable: train a fresh one holding the same prompts
  peft_model = get_peft_model(copy.deepcopy(hf_model), PromptTuningConfig(
      task_type="CAUSAL_LM", num_virtual_tokens=3))
  with torch.no_grad():
    peft_model.prompt_encoder.default.embedding.weight.copy_(
        torch.tensor(np.asarray(v["adapters"]["llm"]["prompt_embeddings"])))
  new = our_sgd_step(model, method, v, batch)
  torch_sgd_step(peft_model, batch, 3)
  np.testing.assert_allclose(np.asarray(new["adapters"]["llm"]["prompt_embeddings"]),
                             trained(peft_model)["prompt_encoder.default.embedding.weight"],
                             atol=2e-5)
  assert_moved(v, new, "llm/prompt_embeddings")


def test_prompt_tuning_peft_saved_adapter_imports_with_same_logits(llama, tmp_path):
  hf_model, model, params, batch, apply = llama
  torch.manual_seed(0)
  peft_model = get_peft_model(copy.deepcopy(hf_model), PromptTuningConfig(
      task_type="CAUSAL_LM", num_virtual_tokens=4))
  peft_model.save_pretrained(str(tmp_path / "peft"))
  method, v = import_peft(str(tmp_path / "peft"), model, params)
  assert method.name == "prompt_tuning" and method.num_virtual_tokens == 4
  with torch.no_grad():
    assert_same_logits(ours(apply, v, batch), torch_forward(peft_model.eval(), batch, 4),
                       batch[1])
  assert_reexport_is_byte_identical(tmp_path / "peft", model, method, v, tmp_path)


def test_multimodal_prompt_tuning_equals_prompts_prepended_to_merged_embeddings(llava):
  """Reference: HF Llava's image-merged input embeddings, the prompts prepended in NumPy, n mask
  ones, positions shifted by n, run through HF's language model; its last T logits."""
  hf_model, model, params, batch, apply = llava
  method = mt.tuning.get("prompt_tuning", num_virtual_tokens=3, prompt_init="random")
  v = method.init_variables(jax.random.key(2), params)
  prompts = np.asarray(v["adapters"]["llm"]["prompt_embeddings"]) * 0.1
  v["adapters"]["llm"]["prompt_embeddings"] = jnp.asarray(prompts)
  ids, mask, px = batch
  with torch.no_grad():
    embeds = hf_model.get_input_embeddings()(torch.tensor(ids))
    feats = hf_model.model.get_image_features(pixel_values=hf_px(px))
    feats = torch.cat(list(feats.pooler_output if hasattr(feats, "pooler_output") else feats))
    is_img = torch.tensor(ids == hf_tiny.IMAGE_TOKEN)[..., None].expand_as(embeds)
    embeds = embeds.masked_scatter(is_img, feats.reshape(-1))
    b = ids.shape[0]
    embeds = np.concatenate([np.broadcast_to(prompts, (b, 3, prompts.shape[1])),
                             embeds.numpy()], 1)
    full_mask = np.concatenate([np.ones((b, 3), mask.dtype), mask], 1)
    out = hf_model.model.language_model(inputs_embeds=torch.tensor(embeds),
                                        attention_mask=torch.tensor(full_mask),
                                        position_ids=torch.tensor(hf_tiny.positions(full_mask)))
    ref = hf_model.lm_head(out.last_hidden_state)[:, 3:].numpy()
  got = ours(apply, v, batch)
  assert_same_logits(got, ref, mask)
  assert np.abs(got - ours(apply, {"params": params}, batch)).max() > 1e-2


# ----------------------------------------------------------------------------- prefix tuning
def test_prefix_tuning_export_loads_in_peft_and_peft_adapter_imports(llama, tmp_path):
  hf_model, model, params, batch, apply = llama
  method = mt.tuning.get("prefix_tuning", num_virtual_tokens=3, encoder_hidden_size=16)
  v = method.init_variables(jax.random.key(3), params)
  export_peft(str(tmp_path / "pfx"), model, method, v)
  peft_model = PeftModel.from_pretrained(copy.deepcopy(hf_model), str(tmp_path / "pfx")).eval()
  assert_keys_match_peft(tmp_path / "pfx", peft_model)
  got = ours(apply, v, batch)
  with torch.no_grad():
    assert_same_logits(got, torch_forward(peft_model, batch), batch[1])
  assert np.abs(got - ours(apply, {"params": params}, batch)).max() > 1e-2
  # the materialized prefix (what peft stores) gives the same logits
  np.testing.assert_allclose(ours(apply, mt.tuning.additive.materialize(v), batch), got,
                             atol=1e-5)
  # peft -> ours
  torch.manual_seed(1)
  peft_model = get_peft_model(copy.deepcopy(hf_model), PrefixTuningConfig(
      task_type="CAUSAL_LM", num_virtual_tokens=2, prefix_projection=False))
  peft_model.save_pretrained(str(tmp_path / "peft"))
  method2, v2 = import_peft(str(tmp_path / "peft"), model, params)
  assert method2.name == "prefix_tuning" and v2["adapters"]["llm"]["prefix_k"].shape == (
      2, 2, model.config.llm.num_kv_heads * model.config.llm.head_dim)
  with torch.no_grad():
    assert_same_logits(ours(apply, v2, batch), torch_forward(peft_model.eval(), batch),
                       batch[1])
  assert_reexport_is_byte_identical(tmp_path / "peft", model, method2, v2, tmp_path)


def test_prefix_tuning_sgd_step_through_the_reparameterization_matches_peft(llama):
  hf_model, model, params, batch, _ = llama
  method = mt.tuning.get("prefix_tuning", num_virtual_tokens=3, encoder_hidden_size=16)
  v = method.init_variables(jax.random.key(4), params)
  peft_model = get_peft_model(copy.deepcopy(hf_model), PrefixTuningConfig(
      task_type="CAUSAL_LM", num_virtual_tokens=3, prefix_projection=True,
      encoder_hidden_size=16))
  ad = v["adapters"]["llm"]
  torch_of = {"prompt_encoder.default.embedding.weight": ("prefix_embedding", False),
              "prompt_encoder.default.transform.0.weight": ("prefix_mlp_w1", True),
              "prompt_encoder.default.transform.0.bias": ("prefix_mlp_b1", False),
              "prompt_encoder.default.transform.2.weight": ("prefix_mlp_w2", True),
              "prompt_encoder.default.transform.2.bias": ("prefix_mlp_b2", False)}
  with torch.no_grad():
    named = dict(peft_model.named_parameters())
    for name, (leaf, transpose) in torch_of.items():
      x = np.asarray(ad[leaf])
      named[name].copy_(torch.tensor(x.T if transpose else x))
  new = our_sgd_step(model, method, v, batch)
  torch_sgd_step(peft_model, batch)
  state = trained(peft_model)
  assert sorted(state) == sorted(torch_of)
  for name, (leaf, transpose) in torch_of.items():
    x = np.asarray(new["adapters"]["llm"][leaf])
    np.testing.assert_allclose(x.T if transpose else x, state[name], atol=2e-5, err_msg=name)
  assert_moved(v, new, "llm/prefix_mlp_w2")


# ----------------------------------------------------------------------------- LLaMA-Adapter
def test_llama_adapter_peft_export_is_refused_where_peft_cannot_load_it(llava, tmp_path):
  """peft's ADAPTION_PROMPT takes llama / mistral models only: on a LLaVA (model_type 'llava')
  `PeftModel.from_pretrained` refuses the directory, so the export refuses first and writes
  nothing."""
  hf_model, model, params = llava[:3]
  method = mt.tuning.get("llama_adapter", adapter_len=2, adapter_layers=1)
  v = method.init_variables(jax.random.key(5), params)
  out = tmp_path / "la"
  with pytest.raises(mt.tuning.MethodError, match=r"llama_adapter cannot be exported for peft "
                                                  r"on model_type 'llava'.*--native"):
    export_peft(str(out), model, method, v)
  assert not out.exists()
  with pytest.raises(ValueError, match="Unsupported model type for adaption prompt"):
    PeftModel(copy.deepcopy(hf_model), AdaptionPromptConfig(adapter_len=2, adapter_layers=1))


def test_llama_adapter_export_loads_in_peft_and_sgd_step_matches(llama, tmp_path):
  hf_model, model, params, batch, apply = llama
  method = mt.tuning.get("llama_adapter", adapter_len=3, adapter_layers=1)
  v = method.init_variables(jax.random.key(5), params)
  np.testing.assert_array_equal(ours(apply, v, batch), ours(apply, {"params": params}, batch))
  v = randomize(v, ("adaption_gate",), scale=1.0)
  v["adapters"]["llm"]["layers"]["attn"]["adaption_gate"] = (
      v["adapters"]["llm"]["layers"]["attn"]["adaption_gate"].at[0].set(0.0))  # layer 0: none
  export_peft(str(tmp_path / "la"), model, method, v)
  peft_model = PeftModel.from_pretrained(copy.deepcopy(hf_model), str(tmp_path / "la"),
                                         is_trainable=True).eval()
  assert_keys_match_peft(tmp_path / "la", peft_model)
  got = ours(apply, v, batch)
  with torch.no_grad():
    assert_same_logits(got, torch_forward(peft_model, batch), batch[1])
  assert np.abs(got - ours(apply, {"params": params}, batch)).max() > 1e-2
  new = our_sgd_step(model, method, v, batch)
  torch_sgd_step(peft_model, batch)
  state = trained(peft_model)
  key = "base_model.model.model.layers.1.self_attn"
  attn = new["adapters"]["llm"]["layers"]["attn"]
  np.testing.assert_allclose(np.asarray(attn["adaption_prompt"][1]),
                             state[f"{key}.adaption_prompt"][0], atol=2e-5)
  np.testing.assert_allclose(np.asarray(attn["adaption_gate"][1:]), state[f"{key}.adaption_gate"],
                             atol=2e-5)
  assert_moved(v, new, "llm/layers/attn/adaption_prompt")
  assert float(attn["adaption_gate"][0]) == 0.0  # layer 0 is not adapted: frozen


def test_llama_adapter_peft_saved_adapter_imports_with_same_logits(llama, tmp_path):
  hf_model, model, params, batch, apply = llama
  torch.manual_seed(2)
  peft_model = get_peft_model(copy.deepcopy(hf_model), AdaptionPromptConfig(
      task_type="CAUSAL_LM", adapter_len=2, adapter_layers=2))
  with torch.no_grad():
    for n, p in peft_model.named_parameters():
      if "adaption_gate" in n:
        p.fill_(0.7)
  peft_model.save_pretrained(str(tmp_path / "peft"))
  method, v = import_peft(str(tmp_path / "peft"), model, params)
  assert method.name == "llama_adapter" and method.adapter_layers == 2
  with torch.no_grad():
    assert_same_logits(ours(apply, v, batch), torch_forward(peft_model.eval(), batch), batch[1])
  assert_reexport_is_byte_identical(tmp_path / "peft", model, method, v, tmp_path)
