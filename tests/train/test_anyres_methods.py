"""Every tuning method, forgetting penalty and post-hoc merge on LLaVA-OneVision (anyres) batches:
a tiny checkpoint directory saved by transformers, LLaVA-format JSON with images of many sizes and
a two-image sample -> one packed batch (crops of the whole batch, position-aligned pack tables)
-> prepare + one jitted train step per method (trained entries move, masked ones never do),
penalties with importance computed from that batch (whose per-sample split gives the packed
logits), WiSE-FT / DARE / TIES / Model Tailor of a tuned model, and `mt.generate` / DaWin on
`mt.hf_inputs` of two prompts with differently sized images.

GIFT runs in its MLLM form (docs/methods.md §5.3 [choice]): caption NLL and token distillation on
synthetic image-caption pairs, here anyres caption batches."""
from __future__ import annotations

import io

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import mllm_tune as mt
from mllm_tune import pytree
from mllm_tune.data.pipeline import SamplePreparer
from mllm_tune.data.synthetic_pairs import PairBatches, make_pair_source
from mllm_tune.posthoc import dawin, dawin_decoding
from tests.helpers import anyres_tiny as at
from tests.helpers import method_steps as ms
from tests.helpers.data import image_bytes

CONNECTOR = ("params/image_newline",) + ms.PROJECTOR


def _image_runs(ids_T: np.ndarray, image_id: int) -> list[int]:
  """Lengths of the runs of image tokens in a token row."""
  runs, n = [], 0
  for is_img in list(ids_T == image_id) + [False]:
    if is_img:
      n += 1
    elif n:
      runs.append(n)
      n = 0
  return runs


@pytest.fixture(scope="module")
def ov(tmp_path_factory):
  """The tiny OneVision (model, params, its directory and processor) and one packed batch."""
  root = tmp_path_factory.mktemp("onevision")
  d, _, proc = at.model_dir(str(root), "llava_onevision")
  return ms.packed_env(root, d, proc=proc)


def test_the_batch_packs_samples_with_images_of_different_sizes_and_a_two_image_sample(ov):
  b, image_id = ov.batch, ov.model.config.image_token_id
  ids, seg = np.asarray(b["input_ids"]), np.asarray(b["segment_ids"])
  assert int(seg.max()) >= 2 and b["pixel_values"].shape[1:] == (28, 28, 3)
  assert b["pack_index"].shape == ids.shape + (4,) and b["pack_newline"].shape == ids.shape
  runs_per_sample = [_image_runs(ids[r, seg[r] == s], image_id)
                     for r in range(ids.shape[0]) for s in range(1, int(seg[r].max()) + 1)]
  assert any(len(r) == 2 for r in runs_per_sample)               # the two-image sample
  assert any(len(r) == 0 for r in runs_per_sample)               # and a text-only one
  assert len({n for r in runs_per_sample for n in r}) >= 3       # token counts of many sizes
  assert bool(np.asarray(b["pack_newline"]).any())                # image_newline is used


# ----------------------------------------------------------------------------- every method
METHODS = ms.method_cases(CONNECTOR, "params/vision/embed/patch_kernel", "|image_newline",
                          ("adapters/vision/prompt_tokens",))


def test_the_cases_cover_every_registered_method():
  ms.assert_cases_cover_every_method(METHODS)


@pytest.mark.parametrize("case", sorted(METHODS))
def test_every_method_prepares_and_steps_on_anyres_batches(ov, case):
  if case == "model_tailor":  # trains nothing; tailoring a tuned model is tested below
    ms.refuses_model_tailor_training(ov)
    return
  prefixes = ("params/projector/", "params/image_newline")
  _, mask = ms.check_method_step(ov, METHODS, case, prefixes, ("params/llm/",) + prefixes)
  if case == "hft-projector-full":  # half the LLM block matrices, the whole connector
    assert all(pytree.mask_any(pytree.flatten(mask)[p]) for p in CONNECTOR)
    assert not pytree.mask_any(mask["params"]["llm"]["embed"]["embedding"])


def test_hft_keeps_image_newline_frozen_unless_the_projector_is_full(ov):
  variables = {"params": ov.params, "adapters": {}}
  for projector, want in (("half", False), ("frozen", False), ("full", True)):
    mask = mt.tuning.get("hft", projector=projector).trainable(variables)
    assert mask["params"]["image_newline"] is want


# ----------------------------------------------------------------------------- sample split
def test_samples_cut_from_the_packed_batch_give_its_logits(ov):
  """Each sample keeps its own crops and its pack-table rows, re-based to them."""
  ms.check_sample_split(ov, ov.model.config.crop_tokens)


# ----------------------------------------------------------------------------- penalties
@pytest.fixture(scope="module")
def importance(ov):
  return ms.importance(ov, ("empirical", "mas"))


@pytest.mark.parametrize("name", sorted(ms.PENALTIES))
def test_penalties_with_lora_on_anyres_batches(ov, importance, name):
  ms.check_penalty(ov, importance, name)


def test_gift_with_lora_distils_on_anyres_caption_batches(ov):
  """GIFT's MLLM form (docs/methods.md §5.3): synthetic image-caption pairs rendered as
  conversations by the training data's preparer, so on OneVision they are anyres batches (crops +
  pack tables), and its aux pass runs the model on them."""
  prepare = SamplePreparer.from_pretrained(ov.dir, ov.model.config, 96)
  pairs = PairBatches(make_pair_source("procedural", num=8, image_size=60), prepare, 2)
  cap = {k: jnp.asarray(v) for k, v in pairs.batch(0).items()}
  assert prepare.anyres_spec.max_crops == 17  # the base crop + the largest grid, 4 x 4
  assert pairs.spec.max_images == 2 * 17 and "pack_index" in cap
  assert cap["pixel_values"].shape[0] in pairs.spec.crop_buckets
  assert int(np.sum(cap["image_valid"])) > 2  # images of several crops
  ms.check_gift(ov, cap)


# ----------------------------------------------------------------------------- post-hoc
@pytest.fixture(scope="module")
def tuned(ov):
  """theta0 and theta_ft: LoRA on q/v + the connector, 2 steps, merged (the method case's run)."""
  return ms.tuned(ov, METHODS[ms.TUNED][0])


def test_merges_of_a_tuned_model_give_finite_logits_on_anyres_batches(ov, tuned):
  theta0, theta_ft = tuned
  merged = ms.check_merges(ov, theta0, theta_ft)
  np.testing.assert_allclose(merged["wise_ft"]["image_newline"],
                             (theta0["image_newline"] + theta_ft["image_newline"]) / 2, atol=1e-6)


def test_model_tailor_on_anyres_calibration_batches(ov, tuned):
  theta0, theta_ft = tuned
  flat = ms.check_model_tailor(ov, theta0, theta_ft)
  np.testing.assert_array_equal(flat["image_newline"], pytree.flatten(theta_ft)["image_newline"])


@pytest.fixture(scope="module")
def prompts(ov):
  """`mt.hf_inputs` of the processor's output for two prompts, a wide and a tall image."""
  imgs = [Image.open(io.BytesIO(image_bytes(w, h, seed=i)))
          for i, (w, h) in enumerate([(100, 40), (40, 120)])]
  tok = ov.proc.tokenizer
  texts = [tok.apply_chat_template([{"role": "user", "content": f"<image> {q}"}],
                                   tokenize=False, add_generation_prompt=True)
           for q in ("what is this", "red")]
  tok.padding_side = "left"
  enc = ov.proc(images=[[imgs[0]], [imgs[1]]], text=texts, return_tensors="np", padding=True)
  kw = mt.hf_inputs(ov.model, enc)
  runs = [_image_runs(row, ov.model.config.image_token_id) for row in kw["input_ids"]]
  assert len(runs[0]) == len(runs[1]) == 1 and runs[0] != runs[1]  # different sizes
  return kw


def test_generate_and_dawin_generate_on_hf_inputs_with_two_image_sizes(ov, tuned, prompts):
  theta0, theta_ft = tuned
  vocab = ov.model.config.llm.vocab_size
  new = np.asarray(mt.generate(ov.model, theta0, **prompts, max_new_tokens=4))
  assert new.shape == (2, 4) and ((0 <= new) & (new < vocab)).all()
  same, lam, _ = dawin_decoding.dawin_generate(ov.model, theta0, theta0, **prompts,
                                               max_new_tokens=4, num_components=None)
  np.testing.assert_array_equal(np.asarray(same), new)  # equal models: plain generation
  toks, lam, mixture = dawin_decoding.dawin_generate(ov.model, theta0, theta_ft, **prompts,
                                                     max_new_tokens=4, num_components=None)
  assert mixture is None and lam.shape == (2,) and np.isfinite(lam).all()
  for b in range(2):  # row b is decoded by its own merged model
    want = mt.generate(ov.model, dawin.dawin_interpolate(theta0, theta_ft, lam[b]), **prompts,
                       max_new_tokens=4)
    np.testing.assert_array_equal(np.asarray(toks)[b], np.asarray(want)[b])
