"""The offline benchmark harness (mllm_tune/bench): prepared arrays, scoring, the cached base,
the run loop and its report, and bad input. The benchmark's *numbers* live in
results/tradeoff.md (a real run); here the tiny config only checks the plumbing."""
from __future__ import annotations

import io
import json
import os
import re

import numpy as np
import pytest

from mllm_tune.benchmark import config as offline
from mllm_tune.eval import vqa_sets as arrays_lib
from mllm_tune.eval import vqa_eval as evaluate
from mllm_tune.benchmark import assets, pretrain, runner
from mllm_tune.data import offline_vqa as ov
from mllm_tune.data.conversation import ChatTokenizer
from mllm_tune.data.images import ImageSpec, decode_image, normalize
from mllm_tune.data.pipeline import SamplePreparer


def tiny_cfg(tmp_path):
  c = offline.get_config()
  c.cache_dir = ""  # $MLLM_TUNE_CACHE: the session's cache (tests/conftest.py), shared with
  # test_retention_tracking, whose `tiny` preset is this very base
  c.out_dir = str(tmp_path / "out")
  c.model.update(dict(image_size=24, patch_size=8, vision_hidden=32, vision_mlp=64,
                      vision_layers=1, vision_heads=2, hidden=32, mlp=64, layers=1, heads=2,
                      kv_heads=1, vocab_size=400))
  c.pretrain.update(dict(steps=3, batch_size=8, num_records=32, warmup_steps=1))
  c.tune.update(dict(steps=2, batch_size=4, num_records=16, warmup_steps=0,
                     importance_records=8))
  c.eval.update(dict(general_per_family=3, downstream=5, batch_size=4, max_new_tokens=3))
  c.run = ("full+ewc", "lora_llm")  # EWC: the importance pass on general data runs too
  c.seeds = (0,)
  return c


@pytest.fixture(scope="module")
def tok():
  return assets.train_tokenizer(400)


def _preparer(tok, size=24, seq=9):
  return SamplePreparer(ChatTokenizer(tok, assets.image_token_id(tok), seq, "chatml"),
                        ImageSpec.clip(size), 256)


def test_prepared_rows_split_prompt_and_answer(tok):
  src = ov.make_source("general", "eval", 24, num_samples=8)
  a = arrays_lib.prepare(src, _preparer(tok))
  assert len(a) == 8 and a.pixels.shape == (8, 24, 24, 3)
  for i in range(8):
    rec = src[i]
    n = int(a.attention_mask[i].sum())
    start = int(np.flatnonzero(a.loss_mask[i])[0])
    answer = tok.decode(a.input_ids[i, start:n])
    assert answer == rec["answer"] + "<|im_end|>\n" or answer == rec["answer"] + "<|im_end|>"
    # the generation prompt ends with ChatML's `<|im_start|>assistant\n`; with this byte-level
    # BPE ("\n" is its own pre-token) it is also the row cut before the answer
    p = a.prompt_ids[i, :a.prompt_len[i]]
    assert tok.decode(p[-3:]).endswith("assistant\n")
    np.testing.assert_array_equal(p, a.input_ids[i, :start])
    assert not a.prompt_ids[i, a.prompt_len[i]:].any()
    np.testing.assert_array_equal(a.pixels[i], np.asarray(decode_image(rec["images"][0])))
  ids, mask, px = a.prompts(np.array([1, 5]), ImageSpec.clip(24))
  assert ids.shape[1] == max(a.prompt_len[1], a.prompt_len[5])
  assert mask.sum(1).tolist() == [a.prompt_len[1], a.prompt_len[5]]
  np.testing.assert_allclose(px["pixel_values"], normalize(a.pixels[[1, 5]], ImageSpec.clip(24)))
  batch = a.batch(np.array([2, 3]), ImageSpec.clip(24))
  assert set(batch) == {"input_ids", "loss_mask", "attention_mask", "pixel_values"}


def test_score_is_normalized_exact_match_per_family():
  a = arrays_lib.VqaArrays("s", *(np.zeros((4, 2), np.int32),) * 3, np.zeros((4, 1, 1, 3)),
                           np.ones(4, np.int32), np.array(["red", "2", "left", "two"]),
                           np.array(["color", "count", "position", "count"]))
  s = evaluate.score(["Red.", "two", "right", "2"], a)
  # VQA normalization: punctuation and case go, number words become digits
  assert s == {"color": 100.0, "count": 100.0, "position": 0.0, "all": 75.0}
  with pytest.raises(ValueError, match="3 predictions for 4 rows"):
    evaluate.score(["a", "b", "c"], a)


@pytest.fixture(scope="module")
def shared_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("bench")


def test_bench_end_to_end_caches_base_and_writes_report(shared_dir, capsys):
  cfg = tiny_cfg(shared_dir)
  runs = runner.run_bench(cfg, progress=False)
  path = pretrain.base_dir(cfg)
  assert assets.exists(path) and os.path.isfile(os.path.join(path, "pretrain.json"))
  assert [r.method for r in runs] == ["full+ewc", "lora_llm"]
  full, lora = runs
  assert full.trainable_params == full.total_params  # full fine-tuning trains everything
  m = cfg.model  # LoRA r(d_in + d_out) on q,k,v,o,gate,up,down of each block
  d, f, kv = m.hidden, m.mlp, m.kv_heads * (m.hidden // m.heads)
  per_layer = 8 * ((d + d) * 2 + (d + kv) * 2 + (d + f) * 2 + (f + d))
  assert lora.trainable_params == per_layer * m.layers
  assert full.base_acc == lora.base_acc  # one zero-shot row for every run
  assert set(full.tuned_acc) == {*cfg.general, cfg.downstream}
  with open(os.path.join(cfg.out_dir, "runs.json")) as fh:
    assert len(json.load(fh)["runs"]) == 2
  assert os.path.isfile(os.path.join(cfg.out_dir, "tradeoff.png"))
  out = capsys.readouterr().out
  assert "| full+ewc |" in out and "| lora_llm |" in out
  # the cached base is reused, not rebuilt
  stamp = os.path.getmtime(os.path.join(path, "model.safetensors"))
  assert pretrain.ensure_base(cfg) == path
  assert os.path.getmtime(os.path.join(path, "model.safetensors")) == stamp
  cfg.pretrain.steps += 1  # a different pre-training config is a different base
  assert pretrain.base_dir(cfg) != path


def test_predictions_do_not_depend_on_batching(shared_dir):
  cfg = tiny_cfg(shared_dir)  # the base cached by the test above (built here if run alone)
  base = runner.load_base(pretrain.ensure_base(cfg))
  sets = runner.prepare_sets(cfg, base)
  p = lambda bs: evaluate.predict(base.model, base.params, None, sets.general_eval, base.spec,
                                  base.tokenizer, batch_size=bs, max_new_tokens=3)
  assert p(5) == p(12)


def test_bad_bench_config(tmp_path):
  cfg = tiny_cfg(tmp_path)
  cfg.run = ("full", "no_such_method")
  with pytest.raises(ValueError, match="unknown bench method 'no_such_method'"):
    runner.run_bench(cfg, progress=False)
  cfg = tiny_cfg(tmp_path)
  cfg.downstream = "color"
  with pytest.raises(ValueError, match="outside the general mix"):
    runner.downstream_source(cfg, "train", 4)
  cfg = tiny_cfg(tmp_path)
  del cfg.methods.lora["lr"]
  with pytest.raises(ValueError, match="methods.lora.lr"):
    runner.method_of(cfg, "lora")
  method, lr, penalty = runner.method_of(tiny_cfg(tmp_path), "full+ewc")
  assert method.name == "freeze" and lr > 0 and penalty["name"] == "ewc"
  with pytest.raises(ValueError, match="empty"):
    arrays_lib.prepare(ov.make_source("color", "eval", 24, num_samples=1), None, 0)
  cfg = tiny_cfg(tmp_path)
  cfg.model.family = "qwen2_vl"
  with pytest.raises(ValueError, match="'qwen2_vl' must be one of 'llava', 'llava_onevision', "
                     "'qwen2_5_vl'"):
    runner.run_bench(cfg, progress=False)


def test_onevision_base_runs_the_benchmark_and_reloads_as_hf(tmp_path):
  """`model.family=llava_onevision`: an anyres base (SigLIP + Qwen2, 5 crops per image) is
  pre-trained, written as a OneVision HF directory, read back by the regular loaders and tuned
  and scored; prompts and training batches carry pack tables over each row's own crops."""
  cfg = tiny_cfg(tmp_path)
  cfg.cache_dir = str(tmp_path / "cache")
  cfg.model.update(dict(family="llava_onevision", crop_size=16))
  cfg.run = ("lora_llm",)
  runs = runner.run_bench(cfg, progress=False)
  assert len(runs) == 1 and set(runs[0].tuned_acc) == {*cfg.general, cfg.downstream}
  base = runner.load_base(pretrain.ensure_base(cfg))
  c = base.model.config
  assert c.model_type == "llava_onevision" and c.vision.model_type == "siglip_vision_model"
  assert c.llm.model_type == "qwen2" and "image_newline" in base.params
  sets = runner.prepare_sets(cfg, base)
  arrays = sets.general_eval
  assert arrays.pixels.shape[1:] == (5, 16, 16, 3)  # base + 2 x 2 grid of 16 px crops
  b = arrays.batch(np.arange(3), base.spec)
  assert b["pixel_values"].shape == (15, 16, 16, 3)
  # row 2's tokens read crops 10..14 only
  used = b["pack_index"][2][b["pack_weight"][2] != 0] // arrays.crop_features
  assert used.min() == 10 and used.max() == 14
  logits = np.asarray(base.model.apply({"params": base.params}, b["input_ids"],
                                       **{k: v for k, v in b.items() if k != "input_ids"
                                          and k != "loss_mask"}))
  one = arrays.batch(np.arange(2, 3), base.spec)
  alone = np.asarray(base.model.apply({"params": base.params}, one["input_ids"],
                                      **{k: v for k, v in one.items() if k != "input_ids"
                                         and k != "loss_mask"}))
  real = b["attention_mask"][2].astype(bool)
  np.testing.assert_allclose(logits[2][real], alone[0][real[:alone.shape[1]]], atol=1e-5)
  p = lambda bs: evaluate.predict(base.model, base.params, None, arrays, base.spec,
                                  base.tokenizer, batch_size=bs, max_new_tokens=3)
  assert p(2) == p(5)


def _model_inputs(batch: dict) -> dict:
  return {k: v for k, v in batch.items() if k not in ("input_ids", "loss_mask")}


def test_qwen2_5_vl_base_runs_the_benchmark_and_matches_transformers(tmp_path, monkeypatch):
  """`model.family=qwen2_5_vl`: a Qwen2.5-VL base (window attention + a full-attention block,
  2 x 2 patch merger, Qwen2 with M-RoPE) is pre-trained, written as an HF directory, read back
  by the regular loaders, tuned and scored. Its training rows (`<|vision_start|><|image_pad|>*9
  <|vision_end|>`, (3, B, T) M-RoPE ids, blocked patch rows) give transformers' logits for the
  same directory; generation prompts carry the rows' positions; full fine-tuning moves the
  downstream replies to the digits; the bench's LoRA wraps Qwen's vision linears too."""
  import torch
  from PIL import Image
  from transformers import Qwen2_5_VLForConditionalGeneration
  from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
      Qwen2VLImageProcessorPil)
  import jax
  from mllm_tune.train import build
  cfg = tiny_cfg(tmp_path)
  cfg.cache_dir = str(tmp_path / "cache")
  cfg.model.update(dict(family="qwen2_5_vl", patch_size=4, vision_layers=2))
  cfg.run = ("full",)
  cfg.methods.full.lr = 1e-2
  cfg.tune.update(dict(steps=40, batch_size=8))
  fits = []  # the bench's own tuning runs, kept to score their weights below
  real_fit = runner.fit
  monkeypatch.setattr(runner, "fit", lambda *a, **kw: fits.append(real_fit(*a, **kw)) or fits[-1])
  runs = runner.run_bench(cfg, progress=False)
  assert len(runs) == 1 and set(runs[0].tuned_acc) == {*cfg.general, cfg.downstream}
  path = pretrain.ensure_base(cfg)
  base = runner.load_base(path)
  c, m = base.model.config, cfg.model
  assert c.model_type == "qwen2_5_vl" and c.llm.model_type == "qwen2" and c.llm.qkv_bias
  assert c.vision.full_attention_layers == (False, True) and c.vision.window_merge == 2
  assert c.llm.rope.mrope_section == (2, 3, 3)  # head_dim 16: Qwen's (16, 24, 24) scaled
  per_linear = lambda d_in, d_out: 8 * (d_in + d_out)  # LoRA rank 8
  d, f, kv = m.hidden, m.mlp, m.kv_heads * m.hidden // m.heads
  dv, fv = m.vision_hidden, m.vision_mlp
  llm = 2 * per_linear(d, d) + 2 * per_linear(d, kv) + 2 * per_linear(d, f) + per_linear(f, d)
  vision = per_linear(dv, 3 * dv) + per_linear(dv, dv) + 2 * per_linear(dv, fv) + per_linear(fv, dv)
  merger = per_linear(4 * dv, 4 * dv) + per_linear(4 * dv, d)
  lora = runner.method_of(cfg, "lora")[0]
  adapters = lora.init_variables(jax.random.key(0), base.params)
  assert build.trainable_mask(lora, adapters, log=False)[1] == (
      m.layers * llm + m.vision_layers * vision + merger)
  sets = runner.prepare_sets(cfg, base)
  arrays, idx = sets.general_eval, np.arange(3)
  b = arrays.batch(idx, base.spec)
  assert b["pixel_values"].shape == (3, 36, 96)  # 24 px: 6 x 6 patches of 3 * 2 * 4 * 4
  assert b["positions"].shape == (3,) + b["input_ids"].shape
  ids = b["input_ids"][0]
  token_id = base.tokenizer.convert_tokens_to_ids
  start = int(np.flatnonzero(ids == token_id("<|vision_start|>"))[0])
  np.testing.assert_array_equal(ids[start + 1:start + 11], [c.image_token_id] * 9
                                + [token_id("<|vision_end|>")])
  t, h, w = b["positions"][:, 0, start + 1:start + 10] - start - 1  # a 3 x 3 merged grid
  assert not t.any() and h.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2] and w.tolist() == [0, 1, 2] * 3
  ours = np.asarray(base.model.apply({"params": base.params}, b["input_ids"], **_model_inputs(b)))
  hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(path).eval()
  proc = Qwen2VLImageProcessorPil.from_pretrained(path)
  records = pretrain.general_source(cfg, "eval", len(arrays))
  for r in idx:
    enc = proc(images=[Image.open(io.BytesIO(records[r]["images"][0]))], return_tensors="np")
    np.testing.assert_allclose(b["pixel_values"][r], enc["pixel_values"], atol=1e-6)
    n = int(b["attention_mask"][r].sum())
    row = torch.tensor(b["input_ids"][r:r + 1, :n], dtype=torch.long)
    with torch.no_grad():
      theirs = hf(input_ids=row, attention_mask=torch.ones_like(row),
                  pixel_values=torch.tensor(enc["pixel_values"]),
                  image_grid_thw=torch.tensor(enc["image_grid_thw"]),
                  mm_token_type_ids=(row == c.image_token_id).long()).logits[0].numpy()
    np.testing.assert_allclose(ours[r, :n], theirs, atol=1e-5)
  p_ids, p_mask, p_img = arrays.prompts(idx, base.spec)
  for r in idx:  # the prompt is the row before its answer, positions included
    k = int(p_mask[r].sum())
    np.testing.assert_array_equal(p_ids[r, :k], b["input_ids"][r, :k])
    np.testing.assert_array_equal(p_img["positions"][:, r, :k], b["positions"][:, r, :k])
  predict = lambda params, rows, bs: evaluate.predict(base.model, params, None, rows, base.spec,
                                                      base.tokenizer, batch_size=bs,
                                                      max_new_tokens=3)
  assert predict(base.params, arrays, 2) == predict(base.params, arrays, 5)
  (tuned_fit,) = fits
  tuned = tuned_fit.variables["params"]
  digits = set("0123456789")
  assert not set(predict(base.params, sets.down_eval, 4)) <= digits
  replies = predict(tuned, sets.down_eval, 4)
  assert set(replies) <= digits
  assert evaluate.score(replies, sets.down_eval)["all"] == runs[0].tuned_acc[cfg.downstream]


@pytest.mark.parametrize("family", ["llava", "llava_onevision", "qwen2_5_vl"])
def test_all_linears_targets_the_familys_own_tower_names(family, tmp_path):
  """The bench's LoRA-family methods wrap every linear layer: `method_of` swaps the
  cross-family `ALL_LINEARS` for the family's own tower names, which select the same modules
  on that family's model with no alternative that matches nothing (no selector warning)."""
  import mllm_tune as mt
  from mllm_tune import pytree
  from tests.helpers import anyres_tiny, qwen_vl_tiny, tiny_models
  if family == "llava":
    params = tiny_models.tiny_llava()[1]
  else:
    hf = (anyres_tiny.llava_onevision() if family == "llava_onevision"
          else qwen_vl_tiny.qwen2_5_vl())
    hf.save_pretrained(str(tmp_path))
    params = mt.load_pretrained(str(tmp_path))[1]
  names = sorted({lp.rsplit("/", 1)[0] for leaf in pytree.leaves(params)
                  if pytree.is_kernel(leaf) for lp, _ in pytree.logical_paths(leaf)})
  own = offline.all_linears(family)
  assert pytree.dead_alternatives(own, names) == []
  pick = lambda pattern: [n for n in names if re.fullmatch(pattern, n)]  # noqa: E731
  assert pick(own) == pick(offline.ALL_LINEARS) and any(n.startswith("vision/") for n in pick(own))
  cfg = offline.get_config()
  cfg.model.family = family
  method, _, _ = runner.method_of(cfg, "lora")
  assert method.targets == own
