"""Every tuning method, forgetting penalty and post-hoc merge on Qwen2.5-VL batches: a tiny
checkpoint directory saved by transformers, LLaVA-format JSON with images of many sizes and a
two-image sample -> one packed batch (the batch's patch rows with their vision ids, pack tables,
(3, B, T) M-RoPE positions) -> prepare + one jitted train step per method (trained entries move,
masked ones never do), penalties with importance computed from that batch (whose per-sample split
gives the packed logits), and WiSE-FT / DARE / TIES of a tuned model."""
from __future__ import annotations

import io
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image

import mllm_tune as mt
from mllm_tune.data.pipeline import SamplePreparer
from mllm_tune.data.synthetic_pairs import (PairBatches, batch_indices, llava_record,
                                            make_pair_source)
from mllm_tune.importance import fisher
from mllm_tune.models import model_kwargs
from mllm_tune.posthoc import dawin, dawin_decoding
from tests.helpers import method_steps as ms
from tests.helpers import qwen_vl_tiny as qt
from tests.helpers.data import image_bytes, sized_records
from tests.helpers.hf_parity import check_packed_samples, hf_per_record

CONNECTOR = ms.PROJECTOR


@pytest.fixture(scope="module")
def qw(tmp_path_factory):
  """The tiny Qwen2.5-VL (model, params, its directory) and one packed batch."""
  root = tmp_path_factory.mktemp("qwen")
  d, hf, proc = qt.model_dir(str(root), "qwen2_5_vl")
  return ms.packed_env(root, d, hf=hf, proc=proc)


def test_the_batch_packs_samples_with_images_of_different_sizes_and_a_two_image_sample(qw):
  b, image_id = qw.batch, qw.model.config.image_token_id
  ids, seg = np.asarray(b["input_ids"]), np.asarray(b["segment_ids"])
  assert int(seg.max()) >= 2 and b["positions"].shape == (3,) + ids.shape
  runs = lambda x: int(np.sum(np.diff(np.concatenate([[0], x == image_id, [0]])) == 1))
  images_per_sample = [runs(ids[r, seg[r] == s])
                       for r in range(ids.shape[0]) for s in range(1, int(seg[r].max()) + 1)]
  assert 2 in images_per_sample and 0 in images_per_sample
  assert len(np.unique(np.asarray(b["vision_segment_ids"]))) >= 5  # 4+ images + padding
  assert "vision_window_ids" in b


# ----------------------------------------------------------------------------- every method
METHODS = ms.method_cases(CONNECTOR, "params/vision/patch_embed/kernel", "", ())


def test_the_cases_cover_every_registered_method():
  ms.assert_cases_cover_every_method(METHODS)


@pytest.mark.parametrize("case", sorted(METHODS))
def test_every_method_prepares_and_steps_on_qwen_batches(qw, case):
  ms.check_qwen_method_step(qw, METHODS, case)


@pytest.mark.parametrize("name", ["prompt_tuning", "prefix_tuning"])
def test_peft_export_of_virtual_tokens_is_refused_on_an_m_rope_model(qw, tmp_path, name):
  """peft hands prompt tuning's virtual tokens to transformers as `inputs_embeds` without
  `input_ids`: transformers' Qwen2.5-VL cannot build the image tokens' M-RoPE positions then,
  so the adapter would give other logits than ours on image inputs (with prefix tuning's prefix
  mask its rope index fails outright). The export says so and names the native format."""
  from mllm_tune.tuning.peft import export_peft
  method = mt.tuning.get(name, num_virtual_tokens=2)
  variables = method.init_variables(jax.random.key(0), qw.params)
  with pytest.raises(mt.tuning.MethodError, match=r"cannot be exported for peft on this model "
                     r"\(M-RoPE.*image inputs.*--native"):
    export_peft(str(tmp_path / "peft"), qw.model, method, variables)
  assert not (tmp_path / "peft").exists()


# ----------------------------------------------------------------------------- sample split
def test_samples_cut_from_the_packed_batch_give_its_logits(qw):
  """Each sample keeps its own patch rows with their vision ids, its pack-table rows re-based to
  them and its (3, L) M-RoPE positions."""
  batch = qw.batch
  tok, seq = fisher.image_spec(qw.model)
  assert (tok, seq) == (qw.model.config.image_token_id, 4)
  examples, stacked = ms.check_sample_split(qw, seq)
  assert stacked["positions"].shape[:2] == (len(ms.answered_samples(batch)), 3)
  assert sum(len(e["images"]) for e in examples) == int((batch["vision_segment_ids"] > 0).sum())


# ----------------------------------------------------------------------------- penalties
@pytest.fixture(scope="module")
def importance(qw):
  return ms.importance(qw, ("empirical", "mas"))


def _torch_importance(qw) -> dict:
  """{kind: {leaf: (L, in, out) float64}}: the empirical Fisher (mean of squared gradients of
  the answer log-likelihood) and MAS (mean of absolute gradients of the answer tokens' mean
  squared logit norm) of the q / v kernels, from transformers' model run on each sample's record
  alone, one backward pass per sample."""
  batch, hf = qw.batch, qw.hf
  refs = hf_per_record(*sized_records(), qt.encode_record(qw.proc))
  weights = {}
  for n, p in hf.named_parameters():
    m = re.fullmatch(r".*language_model\.layers\.(\d+)\.self_attn\.(q|v)_proj\.weight", n)
    if m:
      weights[(f"params/llm/layers/attn/{m[2]}_proj/kernel", int(m[1]))] = p
  sums = {kind: {key: 0.0 for key in weights} for kind in ("empirical", "mas")}
  samples = ms.answered_samples(batch)
  for r, cols in samples:
    ids = np.asarray(batch["input_ids"])[r, cols]
    w = torch.tensor(np.asarray(batch["loss_mask"])[r, cols][1:], dtype=torch.float32)
    logits = hf(**refs[tuple(ids.tolist())]).logits[0, :-1].float()
    target = torch.tensor(ids[1:], dtype=torch.long)[:, None]
    logp = torch.log_softmax(logits, -1).gather(-1, target)[:, 0]
    objectives = {"empirical": (w * logp).sum(),
                  "mas": (w * logits.square().sum(-1)).sum() / w.sum().clamp(min=1.0)}
    for kind, obj in objectives.items():
      for key, g in zip(weights, torch.autograd.grad(obj, list(weights.values()),
                                                      retain_graph=kind == "empirical")):
        g = g.double().numpy().T  # torch (out, in) -> our kernel (in, out)
        sums[kind][key] = sums[kind][key] + (g * g if kind == "empirical" else np.abs(g))
  layers = 1 + max(i for _, i in weights)
  return {kind: {leaf: np.stack([v[(leaf, i)] for i in range(layers)]) / len(samples)
                 for leaf in ms.QV_KERNELS} for kind, v in sums.items()}


def test_fisher_online_ewc_and_mas_equal_per_sample_gradients_of_transformers(qw, importance):
  """The importance the penalties use on a packed Qwen batch (each sample cut out with its own
  patches, vision ids and M-RoPE positions) equals the same sums from transformers' gradients of
  each record alone; online EWC's F~ = gamma F_prev + F with the previous stage's Fisher."""
  ref = _torch_importance(qw)
  for kind in ("empirical", "mas"):
    imp, n = importance[kind]
    assert n == len(ms.answered_samples(qw.batch)) >= 6
    for leaf in ms.QV_KERNELS:
      got, want = np.asarray(imp[leaf], np.float64), ref[kind][leaf]
      assert got.shape == want.shape and want.max() > 0
      np.testing.assert_allclose(got, want, rtol=2e-3, atol=1e-5 * want.max(), err_msg=kind)
  prev = {p: 0.25 * x for p, x in importance["empirical"][0].items()}
  online = fisher.online_update(prev, importance["empirical"][0], 0.5)
  for leaf in ms.QV_KERNELS:
    np.testing.assert_allclose(online[leaf], 1.125 * ref["empirical"][leaf], rtol=2e-3,
                               atol=1e-5 * ref["empirical"][leaf].max())


@pytest.mark.parametrize("name", sorted(ms.PENALTIES))
def test_penalties_with_lora_on_qwen_batches(qw, importance, name):
  lora, afters, terms = ms.check_penalty(qw, importance, name)
  if name == "kl":  # step 2: KL(p_theta0 || p_theta1) per supervised position, float64
    apply = jax.jit(lambda v, b: qw.model.apply(v, b["input_ids"], **model_kwargs(b)))
    log_softmax = lambda z: z - z.max(-1, keepdims=True) - np.log(
        np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True))
    lq = log_softmax(np.asarray(qw.logits(qw.params, qw.batch), np.float64)[:, :-1])
    lp = log_softmax(np.asarray(apply(afters[0], qw.batch), np.float64)[:, :-1])
    w = np.asarray(qw.batch["loss_mask"], np.float64)[:, 1:]
    kl = (w * (np.exp(lq) * (lq - lp)).sum(-1)).sum() / w.sum()
    np.testing.assert_allclose(terms[1], kl, rtol=1e-3)


@pytest.mark.parametrize("groups", [1, 2])
def test_gift_with_lora_distils_on_qwen_caption_batches(qw, groups):
  """GIFT's caption pairs prepared by Qwen's preparer are Qwen batches (patch rows, vision ids,
  pack tables, M-RoPE positions) whose rows give transformers' logits of each pair alone; GIFT
  trains on them as on OneVision's. With 2 image groups (two data-parallel shards) each row's
  image has its own patch block."""
  prepare = SamplePreparer.from_pretrained(qw.dir, qw.model.config, 96)
  source = make_pair_source("procedural", num=8, image_size=60)
  pairs = PairBatches(source, prepare, 2, image_groups=groups)
  cap = pairs.batch(0)
  assert pairs.spec.qwen and cap["positions"].shape == (3,) + cap["input_ids"].shape
  px = cap["pixel_values"]
  assert (px.shape[0] if groups == 1 else px.shape[0] * px.shape[1]) in pairs.spec.crop_buckets
  assert px.ndim == (2 if groups == 1 else 3)
  assert set(np.unique(cap["vision_segment_ids"]).tolist()) == {0, 1, 2}  # 2 images, padding
  assert "vision_window_ids" in cap
  records = [llava_record(source, int(i)) for i in batch_indices(len(source), 2, 0, 0)]
  encode = qt.encode_record(qw.proc)
  refs = hf_per_record(records, {}, lambda rec, _: encode(
      rec, [Image.open(io.BytesIO(b)) for b in rec["images"]]))
  assert check_packed_samples(qw.model, qw.params, cap, refs, qw.hf) == (2, 2)
  ms.check_gift(qw, {k: jnp.asarray(v) for k, v in cap.items()})


# ----------------------------------------------------------------------------- post-hoc
@pytest.fixture(scope="module")
def tuned(qw):
  """theta0 and theta_ft: LoRA on q/v + the merger, 2 steps, merged (the method case's run)."""
  return ms.tuned(qw, METHODS[ms.TUNED][0])


def test_merges_of_a_tuned_model_give_finite_logits_on_qwen_batches(qw, tuned):
  ms.check_merges(qw, *tuned)


def test_model_tailor_on_qwen_calibration_batches(qw, tuned):
  ms.check_model_tailor(qw, *tuned)


# ----------------------------------------------------------------------------- DaWin decoding
QUESTIONS = [((100, 40), "what is this"), ((40, 120), "red")]  # a wide and a tall image


def _prompt(qw, q: str) -> str:
  messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}]
  return qw.proc.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _images():
  return [Image.open(io.BytesIO(image_bytes(w, h, seed=i)))
          for i, ((w, h), _) in enumerate(QUESTIONS)]


def _hf_greedy_entropy(hf, enc, steps: int, eos: int) -> tuple[list[int], float]:
  """transformers' greedy answer of one prompt by full forwards (no cache: positions recomputed
  from the whole sequence each step) and its DaWin H: the mean entropy (float64) of the
  distributions that chose the tokens, up to and including the first end token."""
  ids, tokens, ents = enc["input_ids"], [], []
  for _ in range(steps):
    kw = dict(enc, input_ids=ids, attention_mask=torch.ones_like(ids),
              mm_token_type_ids=(ids == hf.config.image_token_id).long())
    with torch.no_grad():
      logp = torch.log_softmax(hf(**kw).logits[0, -1].double(), -1)
    ents.append(float(-(logp.exp() * logp).sum()))
    tokens.append(int(logp.argmax()))
    ids = torch.cat([ids, torch.tensor([[tokens[-1]]])], 1)
  n = tokens.index(eos) + 1 if eos in tokens else steps
  return tokens, float(np.mean(ents[:n]))


def test_dawin_generate_on_qwen_prompts_uses_their_positions_and_vision_inputs(qw, tuned,
                                                                               tmp_path):
  """`dawin_generate` on `mt.hf_inputs` of two Qwen prompts (left-padded, images of two sizes):
  the per-sample coefficients are DaWin's offset formula on the entropies of transformers' own
  greedy answers of each prompt alone (theta0 and theta_ft loaded in transformers), and each
  row is decoded by its merged model."""
  theta0, theta_ft = tuned
  proc, model = qw.proc, qw.model
  proc.tokenizer.padding_side = "left"
  enc = proc(images=_images(), text=[_prompt(qw, q) for _, q in QUESTIONS], return_tensors="np",
             padding=True)
  prompts = mt.hf_inputs(model, enc)
  assert set(prompts) >= {"positions", "vision_segment_ids", "vision_pos_hw",
                          "vision_window_ids", "pack_index"}
  toks, lam, mixture = dawin_decoding.dawin_generate(model, theta0, theta_ft, **prompts,
                                                     max_new_tokens=4, num_components=None)
  assert mixture is None and lam.shape == (2,)
  ft_dir = str(tmp_path / "ft")
  mt.save_pretrained(ft_dir, model, theta_ft)
  hf_ft = type(qw.hf).from_pretrained(ft_dir).eval()
  eos = qw.hf.generation_config.eos_token_id
  ours0 = np.asarray(mt.generate(model, theta0, **prompts, max_new_tokens=4))
  h, stopped = {}, 0
  for name, hf in (("0", qw.hf), ("ft", hf_ft)):
    for b, (img, (_, q)) in enumerate(zip(_images(), QUESTIONS)):
      one = proc(images=[img], text=[_prompt(qw, q)], return_tensors="pt")
      tokens, h[name, b] = _hf_greedy_entropy(hf, dict(one), 4, eos)
      stopped += eos in tokens[:-1]
      if name == "0":  # our batched greedy answer is transformers' answer of the prompt alone
        n = tokens.index(eos) + 1 if eos in tokens else 4
        np.testing.assert_array_equal(ours0[b, :n], tokens[:n])
  h0, hft = (np.array([h[name, b] for b in range(2)]) for name in ("0", "ft"))
  assert stopped  # an answer ends early: H averages up to its end token, not the padding after
  assert np.abs(h0 - hft).max() > 1e-4  # the two models are unsure to different degrees
  cv = lambda x: x.std(ddof=1) / x.mean()
  b_, w_ = (cv(h0) + cv(hft)) / 2, (h0.mean() + hft.mean()) / h0.mean()
  want = (np.exp(-hft) + b_ / w_) / (np.exp(-h0) + np.exp(-hft) + b_)
  np.testing.assert_allclose(lam, want, rtol=1e-4)
  for b in range(2):  # row b is decoded by its own merged model
    merged = dawin.dawin_interpolate(theta0, theta_ft, lam[b])
    want_b = mt.generate(model, merged, **prompts, max_new_tokens=4)
    np.testing.assert_array_equal(np.asarray(toks)[b], np.asarray(want_b)[b])
