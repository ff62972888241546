"""Every tuning method, forgetting penalty and post-hoc merge on Qwen2.5-VL batches: a tiny
checkpoint directory saved by transformers, LLaVA-format JSON with images of many sizes and a
two-image sample -> one packed batch (the batch's patch rows with their vision ids, pack tables,
(3, B, T) M-RoPE positions) -> prepare + one jitted train step per method (trained entries move,
masked ones never do), penalties with importance computed from that batch (whose per-sample split
gives the packed logits), and WiSE-FT / DARE / TIES of a tuned model."""
from __future__ import annotations

import jax
import numpy as np
import pytest

import mllm_tune as mt
from mllm_tune.importance import fisher
from tests.helpers import method_steps as ms
from tests.helpers import qwen_vl_tiny as qt

CONNECTOR = ms.PROJECTOR


@pytest.fixture(scope="module")
def qw(tmp_path_factory):
  """The tiny Qwen2.5-VL (model, params, its directory) and one packed batch."""
  root = tmp_path_factory.mktemp("qwen")
  d, _, _ = qt.model_dir(str(root), "qwen2_5_vl")
  return ms.packed_env(root, d)


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
  if case == "model_tailor":  # trains nothing; tailoring a tuned model is tested below
    ms.refuses_model_tailor_training(qw)
    return
  if case == "vpt":  # prompt tokens need a CLIP / SigLIP tower's token sequence
    with pytest.raises(mt.tuning.MethodError, match="needs a vision tower.*LLaVA models only"):
      METHODS[case][0]().init_variables(jax.random.key(1), qw.params)
    return
  ms.check_method_step(qw, METHODS, case, ("params/projector/",),
                       ("params/llm/", "params/projector/"))


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
  return ms.importance(qw, ("empirical",))


PENALTIES = ("ewc", "l2sp", "lwf")


@pytest.mark.parametrize("name", PENALTIES)
def test_penalties_with_lora_on_qwen_batches(qw, importance, name):
  ms.check_penalty(qw, importance, name)


# ----------------------------------------------------------------------------- post-hoc
@pytest.fixture(scope="module")
def tuned(qw):
  """theta0 and theta_ft: LoRA on q/v + the merger, 2 steps, merged (the method case's run)."""
  return ms.tuned(qw, METHODS[ms.TUNED][0])


def test_merges_of_a_tuned_model_give_finite_logits_on_qwen_batches(qw, tuned):
  ms.check_merges(qw, *tuned)


def test_model_tailor_on_qwen_calibration_batches(qw, tuned):
  ms.check_model_tailor(qw, *tuned)
