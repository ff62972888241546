"""Retention tracking (train/tracking.py, eval/retention.py, eval/vqa_sets.py) on Qwen2.5-VL data:
eval sets of LLaVA-format records with images of several sizes (one with two images) are
prepared with Qwen's preparer (patch rows, grids, M-RoPE positions of the training rows and of
the generation prompts), and the tracker's step-0 record equals a direct evaluation with
transformers: the KL from θ0, agreement, loss and token accuracy from each record's logits in
float64, and the VQA scores from transformers' greedy answers of each prompt alone."""
from __future__ import annotations

import io

import jax
import numpy as np
import pytest
import torch
from PIL import Image

from configs import base as base_cfg
import mllm_tune as mt
from mllm_tune.eval import vqa_eval
from mllm_tune.eval.vqa import vqa_accuracy
from mllm_tune.train import tracking
from tests.helpers import qwen_vl_tiny as qt
from tests.helpers.data import SIZES_WH, image_bytes, write_llava_dataset

QUESTIONS = ["what is this", "which colour", "how many", "is it red"]
NEW_TOKENS = 3


def _records(answers) -> tuple[list[dict], dict]:
  """Four records: one image each, the third two (sizes from SIZES_WH)."""
  records, images = [], {}
  for i, (q, a) in enumerate(zip(QUESTIONS, answers)):
    names = [f"e{i}_{j}.png" for j in range(2 if i == 2 else 1)]
    for j, n in enumerate(names):
      images[n] = image_bytes(*SIZES_WH[(i + 2 * j) % len(SIZES_WH)], seed=50 + i + j)
    records.append({"id": str(i), "image": names if len(names) > 1 else names[0],
                    "conversations": [
                        {"from": "human", "value": " ".join(["<image>"] * len(names) + [q])},
                        {"from": "gpt", "value": a}]})
  return records, images


def _hf_prompt(proc, rec, imgs) -> dict:
  """transformers' processor output for the record's generation prompt (the turns before its
  answer + the template's generation prompt)."""
  text = proc.apply_chat_template(qt.hf_messages(rec["conversations"])[:-1], tokenize=False,
                                  add_generation_prompt=True)
  return proc(images=imgs, text=[text], return_tensors="pt")


def _hf_answer(hf, proc, enc) -> str:
  """transformers' greedy answer to a prompt, cut at <|im_end|>."""
  eos = proc.tokenizer.convert_tokens_to_ids("<|im_end|>")
  with torch.no_grad():
    out = hf.generate(**enc, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=eos,
                      pad_token_id=0)[0, enc["input_ids"].shape[1]:].tolist()
  out = out[:out.index(eos)] if eos in out else out
  return proc.tokenizer.decode(out, skip_special_tokens=True).strip()


def _log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  """The tiny Qwen2.5-VL directory, θ0 and a perturbed copy θ (ours and in transformers)."""
  root = tmp_path_factory.mktemp("qwen_tracking")
  d, hf0, proc = qt.model_dir(str(root), "qwen2_5_vl")
  model, params = mt.load_pretrained(d)
  keys = iter(jax.random.split(jax.random.key(0), 1000))
  tuned = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(next(keys), x.shape, x.dtype),
                       params)
  mt.save_pretrained(str(root / "tuned"), model, tuned)
  hf1 = type(hf0).from_pretrained(str(root / "tuned")).eval()
  return root, d, proc, model, params, tuned, hf0, hf1


def test_tracker_on_qwen_sets_equals_a_direct_evaluation_with_transformers(env):
  root, d, proc, model, params, tuned, hf0, hf1 = env
  # answers: records 0 and 2 get θ's own greedy answer, so the task score is not 0
  records, images = _records(["x"] * 4)
  pil = lambda rec: [Image.open(io.BytesIO(images[n])) for n in np.atleast_1d(rec["image"])]
  for i in (0, 2):
    answer = _hf_answer(hf1, proc, _hf_prompt(proc, records[i], pil(records[i])))
    records[i]["conversations"][1]["value"] = answer or "x"
  path = write_llava_dataset(str(root / "eval"), records, images)
  folder = str(root / "eval" / "images")
  c = base_cfg.get_config()
  c.model.update(source="hf", path=d)
  c.run_dir = str(root / "run")
  c.train.eval_every = 1
  c.eval.update(dict(batch_size=3, max_new_tokens=NEW_TOKENS, report=False))
  c.eval.target.t = base_cfg.eval_set("llava_json", json_path=path, image_folder=folder,
                                      metric="token")
  c.eval.retention.r = base_cfg.eval_set("llava_json", json_path=path, image_folder=folder)
  method = mt.tuning.get("freeze")
  variables = {"params": tuned, "adapters": {}}
  mask = method.trainable(variables)
  _, frozen = mt.tuning.partition(variables, mask)
  run = tracking.RunView(model, method, frozen, lambda: variables, c.run_dir, lambda b: b,
                         lambda p, s: None)
  tracker = tracking.Tracker.create(c, run, params, variables, mask)
  arrays = tracker.evaluator.sets[1].arrays
  assert arrays.grids.shape == (4, 2, 3) and arrays.positions.shape[:2] == (4, 3)
  rec = tracker.start(0)
  ref = tracker.reference
  # direct evaluation: transformers' logits of each record and of each generation prompt, its
  # greedy answers of each prompt
  ev = tracker.evaluator
  ids, mask, prompt_images = arrays.prompts(np.arange(4), ev.spec)
  z_prompts = np.asarray(model.apply({"params": tuned}, ids, attention_mask=mask,
                                     **prompt_images))
  sums = dict(kl=0.0, agree=0.0, nll=0.0, correct=0.0, n=0.0)
  score, answers = {"0": [], "ft": []}, {"0": [], "ft": []}
  for i, r in enumerate(records):
    enc = qt.encode_record(proc)(r, pil(r))
    n = enc["input_ids"].shape[1]
    np.testing.assert_array_equal(arrays.input_ids[i, :n], enc["input_ids"][0].numpy())
    with torch.no_grad():
      lq, lp = (_log_softmax(hf(**enc).logits[0, :-1].double().numpy()) for hf in (hf0, hf1))
    w = arrays.loss_mask[i, 1:n].astype(np.float64)
    target = enc["input_ids"][0, 1:].numpy()
    sums["kl"] += (w * (np.exp(lq) * (lq - lp)).sum(-1)).sum()
    sums["agree"] += (w * (lq.argmax(-1) == lp.argmax(-1))).sum()
    sums["nll"] -= (w * lp[np.arange(n - 1), target]).sum()
    sums["correct"] += (w * (lp.argmax(-1) == target)).sum()
    sums["n"] += w.sum()
    prompt = _hf_prompt(proc, r, pil(r))
    np.testing.assert_array_equal(ids[i, :mask[i].sum()], prompt["input_ids"][0].numpy())
    with torch.no_grad():
      want = hf1(**prompt).logits[0].numpy()
    np.testing.assert_allclose(z_prompts[i, :mask[i].sum()], want, atol=1e-4, rtol=0)
    for name, hf in (("0", hf0), ("ft", hf1)):
      answer = _hf_answer(hf, proc, prompt)
      answers[name].append(answer)
      score[name].append(100.0 * vqa_accuracy(answer, [r["conversations"][1]["value"]] * 10))
  # the evaluator's greedy answers of the prompt batches: transformers' ones
  for name, params_ in (("0", params), ("ft", tuned)):
    assert vqa_eval.predict(model, params_, None, arrays, ev.spec, ev.tokenizer, batch_size=3,
                            max_new_tokens=NEW_TOKENS, eos_token_id=ev.eos) == answers[name]
  key = "eval/retention/r"
  assert np.mean(score["ft"]) >= 50.0  # θ answers records 0 and 2 as their references
  assert rec[key] == pytest.approx(np.mean(score["ft"]), abs=1e-9)
  assert ref[key] == pytest.approx(np.mean(score["0"]), abs=1e-9)
  assert rec[f"{key}/kl"] == pytest.approx(sums["kl"] / sums["n"], rel=1e-4)
  assert rec[f"{key}/kl"] > 1e-3
  assert rec[f"{key}/agree"] == pytest.approx(sums["agree"] / sums["n"], abs=1e-9)
  assert rec[f"{key}/loss"] == pytest.approx(sums["nll"] / sums["n"], rel=1e-5)
  token_acc = 100.0 * sums["correct"] / sums["n"]
  assert rec[f"{key}/token_acc"] == pytest.approx(token_acc, abs=1e-9)
  assert rec["eval/target/t"] == pytest.approx(token_acc, abs=1e-9)
  assert rec["tradeoff/F"] == pytest.approx(rec[key] - ref[key], abs=1e-9)
