"""Trainable tokens (`tuning/selective/tokens.py`, `models.llm.TokenEmbed`) against peft's
`TrainableTokens` on the same tiny LLaVA: same rows -> same logits and the same gradient of the
rows, with an untied LM head (CLIP + Llama: only the lookup changes) and a tied one (SigLIP +
Qwen2: the head reads the rows too); identity at init, exact merge, only the rows train, our adapter
files keep the token ids as integers; clear errors."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from peft import TrainableTokensConfig, get_peft_model

import mllm_tune as mt
from mllm_tune import pytree
from mllm_tune.train import step as step_lib
from mllm_tune.tuning import files
from tests.helpers import hf_tiny
from tests.helpers.peft_ref import ce_loss_jax, ce_loss_torch, hf_px, token_llava

TOKENS = (0, 5, 20, 23, 60)  # 0 is the pad id (HF's padding_idx), here at a real position too


def _pair(tmp_path, tied: bool):
  hf_model, model, params, batch, _ = token_llava(tmp_path, tied)
  return hf_model, model, params, batch


@pytest.mark.parametrize("tied", [False, True])
def test_rows_give_peft_logits_and_gradients(tmp_path, tied):
  hf_model, model, params, (ids, mask, px) = _pair(tmp_path, tied)
  method = mt.tuning.get("trainable_tokens", token_indices=TOKENS)
  variables = method.init_variables(jax.random.key(0), params)
  base = np.asarray(model.apply({"params": params}, ids, mask, pixel_values=px))
  # identity at init (a tied head computes the rows' logits in a product of their own: rounding)
  np.testing.assert_allclose(np.asarray(model.apply(variables, ids, mask, pixel_values=px)),
                             base, rtol=0, atol=1e-6)
  peft_model = get_peft_model(hf_model, TrainableTokensConfig(token_indices=list(TOKENS)))
  (name, delta), = [(n, p) for n, p in peft_model.named_parameters() if p.requires_grad]
  assert "trainable_tokens_delta" in name
  rows = np.random.RandomState(1).randn(len(TOKENS), delta.shape[1]).astype(np.float32) * 0.3
  with torch.no_grad():
    delta.copy_(torch.tensor(rows))
  flat = pytree.flatten(variables)
  np.testing.assert_array_equal(flat["adapters/llm/embed/token_rows"],
                                np.asarray(params["llm"]["embed"]["embedding"])[list(TOKENS)])
  flat["adapters/llm/embed/token_rows"] = jnp.asarray(rows)
  variables = pytree.unflatten(flat)

  out = peft_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                   pixel_values=hf_px(px), position_ids=torch.tensor(hf_tiny.positions(mask)))
  loss_t = ce_loss_torch(out.logits, ids, mask)
  loss_t.backward()
  ours = np.asarray(model.apply(variables, ids, mask, pixel_values=px))
  np.testing.assert_allclose(ours, out.logits.detach().numpy(), atol=1e-4, rtol=1e-4)
  assert np.abs(ours - base).max() > 1e-2  # the rows matter

  def loss(rows_nD):
    f = {**flat, "adapters/llm/embed/token_rows": rows_nD}
    return ce_loss_jax(model.apply(pytree.unflatten(f), ids, mask, pixel_values=px), ids, mask)
  grad = np.asarray(jax.grad(loss)(jnp.asarray(rows)))
  want = delta.grad.numpy()
  # the pad row: no gradient through the lookup (a tied head's reaches it)
  assert np.abs(want).max() > 1e-3 and np.any(want[0]) == tied
  np.testing.assert_allclose(grad, want, atol=2e-5, rtol=1e-4)
  # the train step's chunked head + cross-entropy (a tied head reads the rows there too)
  fns = step_lib.StepFns(model, method, None, loss_chunk=4)
  batch = {"input_ids": ids, "attention_mask": mask, "pixel_values": px, "loss_mask": mask}

  def chunked(rows_nD):
    f = pytree.unflatten({**flat, "adapters/llm/embed/token_rows": rows_nD})
    assert step_lib.chunked_loss(fns, f)
    _, nll, n, _ = step_lib.model_ce(fns, f, batch, trained_head=tied)
    return nll / n
  np.testing.assert_allclose(np.asarray(jax.grad(chunked)(jnp.asarray(rows))), want, atol=2e-5,
                             rtol=1e-4)

  # full fine-tuning of the table: transformers' gradient (none through the pad id's lookup;
  # a tied head's own gradient reaches that row)
  torch_model = hf_tiny.siglip_qwen2() if tied else hf_tiny.clip_llama()
  out = torch_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                    pixel_values=hf_px(px), position_ids=torch.tensor(hf_tiny.positions(mask)))
  ce_loss_torch(out.logits, ids, mask).backward()
  want_table = torch_model.get_input_embeddings().weight.grad.numpy()

  def full(table):
    p = {**params, "llm": {**params["llm"], "embed": {"embedding": table}}}
    return ce_loss_jax(model.apply({"params": p}, ids, mask, pixel_values=px), ids, mask)
  got_table = np.asarray(jax.grad(full)(params["llm"]["embed"]["embedding"]))
  np.testing.assert_allclose(got_table, want_table, atol=2e-5, rtol=1e-4)
  assert np.any(want_table[0]) == tied

  merged = method.merge(variables)  # the rows written into the table
  np.testing.assert_allclose(np.asarray(model.apply({"params": merged}, ids, mask,
                                                    pixel_values=px)), ours, atol=1e-5)


def test_only_the_rows_train_the_adapter_files_keep_the_ids_and_bad_indices_are_refused(
    tmp_path):
  _, model, params, (ids, mask, px) = _pair(tmp_path, False)
  method = mt.tuning.get("trainable_tokens", token_indices=TOKENS)
  variables = method.init_variables(jax.random.key(0), params)
  trained = pytree.flatten(method.trainable(variables))
  assert {p for p, m in trained.items() if m} == {"adapters/llm/embed/token_rows"}
  flat = pytree.flatten(variables)
  flat["adapters/llm/embed/token_rows"] = flat["adapters/llm/embed/token_rows"] + 0.5
  variables = pytree.unflatten(flat)
  files.save_adapters(str(tmp_path / "native"), method, variables)
  loaded_method, loaded = files.load_adapters(str(tmp_path / "native"), params)
  assert loaded_method == method
  ids_leaf = pytree.flatten(loaded)["adapters/llm/embed/token_indices"]
  assert ids_leaf.dtype == np.int32 and tuple(np.asarray(ids_leaf)) == TOKENS
  np.testing.assert_array_equal(
      np.asarray(model.apply(loaded, ids, mask, pixel_values=px)),
      np.asarray(model.apply(variables, ids, mask, pixel_values=px)))
  for bad, match in [((), "token_indices is empty"), ((3, 3), "lists a token twice"),
                     ((5, 100), r"token_indices \[100\] are outside the vocabulary \(0 .. 99\)")]:
    with pytest.raises(mt.tuning.MethodError, match=match):
      mt.tuning.get("trainable_tokens", token_indices=bad).init_variables(
          jax.random.key(0), params)
