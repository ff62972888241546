"""Comparisons against transformers shared by the LLaVA-NeXT / OneVision and Qwen2-VL / 2.5-VL
tests: safetensors files tensor by tensor, a PEFT LoRA both ways (peft -> ours -> peft) with logit
parity, packed samples and evaluation sets against transformers' forward of each record alone,
and a processor call for video records without a video processor."""
from __future__ import annotations

import io
import os

import jax
import numpy as np
import torch
from PIL import Image
from peft import LoraConfig, PeftModel
from safetensors import safe_open

import mllm_tune as mt
from mllm_tune.tuning.peft import export_peft, import_peft
from tests.helpers.peft_ref import saved_peft

ATOL = 1e-4


def safetensors_tensors(d: str) -> dict:
  """{name: torch tensor} of every `*.safetensors` file in a directory."""
  out = {}
  for fn in sorted(f for f in os.listdir(d) if f.endswith(".safetensors")):
    with safe_open(os.path.join(d, fn), "pt") as f:
      out.update({k: f.get_tensor(k) for k in f.keys()})
  return out


def assert_same_tensors(a: dict, b: dict):
  """Same names, dtypes, shapes and bytes."""
  assert sorted(a) == sorted(b)
  raw = lambda x: x if x.dtype == torch.bool else x.view(torch.uint8)
  for k in a:
    assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
    assert torch.equal(raw(a[k]), raw(b[k])), k


LLM_QVD = r".*language_model.*\.(q_proj|v_proj|down_proj)"


def check_peft_lora_both_ways(hf_model, base_dir: str, model, params, enc: dict, hf_logits,
                              fresh_hf_model, tmp_path, target_modules: str = LLM_QVD,
                              **lora_kw):
  """A peft LoRA (r 4 on `target_modules`, by default the language model's q / v / down
  projections, and `lora_kw` such as target_parameters; random B) saved by peft ->
  `import_peft`: our logits on `mt.hf_inputs(enc)` equal peft's (`hf_logits(module, enc)`) and
  differ from the base's; `export_peft` -> `PeftModel.from_pretrained` on `fresh_hf_model()`
  gives peft's logits again. Returns the imported (method, variables)."""
  real = enc["attention_mask"].astype(bool)
  peft_dir = str(tmp_path / "peft")
  peft_model = saved_peft(hf_model, LoraConfig(r=4, lora_alpha=8, target_modules=target_modules,
                                               **lora_kw), peft_dir)
  method, variables = import_peft(peft_dir, model, params)
  kw = mt.hf_inputs(model, enc)
  apply = jax.jit(model.apply)  # op by op, a tiny model's forward is slower than its compile
  ours = np.asarray(apply(variables, **kw))
  ref = hf_logits(peft_model.eval(), enc)
  np.testing.assert_allclose(ours[real], ref[real], atol=ATOL)
  assert np.abs(ours - np.asarray(apply({"params": params}, **kw))).max() > 1e-2
  out = str(tmp_path / "again")  # ours -> peft: loads on a fresh transformers model
  export_peft(out, model, method, variables, base_model_name_or_path=base_dir)
  again = PeftModel.from_pretrained(fresh_hf_model(), out).eval()
  np.testing.assert_allclose(hf_logits(again, enc)[real], ref[real], atol=ATOL)
  return method, variables


def hf_per_record(records: list[dict], images: dict[str, bytes], encode) -> dict:
  """{token ids: `encode(record, its PIL images)`} (a transformers processor's output with
  `input_ids` (1, T)) of each LLaVA record."""
  out = {}
  for rec in records:
    names = rec.get("image") or []
    names = [names] if isinstance(names, str) else names
    enc = encode(rec, [Image.open(io.BytesIO(images[n])) for n in names])
    out[tuple(enc["input_ids"][0].tolist())] = enc
  return out


def check_packed_samples(model, params, batch: dict, ref_by_ids: dict, hf_model,
                         atol: float = ATOL) -> tuple[int, int]:
  """Every packed sample of `batch` is a record of `ref_by_ids` (`hf_per_record`) and our
  packed logits at its columns equal transformers' forward of the record alone. Returns
  (samples checked, samples with images)."""
  ids = batch["input_ids"]
  ours = np.asarray(model.apply({"params": params}, ids, **mt.models.model_kwargs(batch)))
  checked, with_images = 0, 0
  for r in range(ids.shape[0]):
    for seg in range(1, int(batch["segment_ids"][r].max()) + 1):
      cols = np.flatnonzero(batch["segment_ids"][r] == seg)
      key = tuple(ids[r, cols].tolist())
      assert key in ref_by_ids, "a packed sample's tokens differ from the HF processor's"
      with torch.no_grad():
        ref = hf_model(**ref_by_ids[key]).logits[0].float().numpy()
      np.testing.assert_allclose(ours[r, cols], ref, atol=atol, rtol=0)
      checked += 1
      with_images += model.config.image_token_id in key
  return checked, with_images


def processor_without_videos(proc, images, text: str) -> dict:
  """transformers' processor output (torch) for `text` and `images`, its video placeholder left
  as one token: the processor has no video processor here (it needs torchvision), so its
  "video tokens without videos" check is switched off for the call."""
  saved, proc.video_token = proc.video_token, None
  try:
    return dict(proc(images=images or None, text=[text], return_tensors="pt"))
  finally:
    proc.video_token = saved


def check_eval_set(model, params, hf_model, arr, spec, refs: list[tuple[dict, dict]],
                   atol: float = ATOL) -> None:
  """The rows and generation prompts of an in-run evaluation set (`eval/vqa_sets.VqaArrays`)
  give transformers' logits on each record's reference inputs: `refs[r]` = (the record's
  processor output, its generation prompt's)."""
  from mllm_tune.models import model_kwargs
  idx = np.arange(len(refs))
  batch = arr.batch(idx, spec)
  rows = np.asarray(model.apply({"params": params}, batch["input_ids"], **model_kwargs(batch)))
  p_ids, p_mask, p_px = arr.prompts(idx, spec)
  prompts = np.asarray(model.apply({"params": params}, p_ids, attention_mask=p_mask, **p_px))
  for r, (row_enc, prompt_enc) in enumerate(refs):
    for got, enc in ((rows[r], row_enc), (prompts[r], prompt_enc)):
      with torch.no_grad():
        ref = hf_model(**enc).logits[0].float().numpy()
      np.testing.assert_allclose(got[:enc["input_ids"].shape[1]], ref, atol=atol, rtol=0)
