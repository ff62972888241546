"""Qwen2-VL / Qwen2.5-VL videos in our LLaVA-JSON data pipeline: frames (a folder, or listed)
-> patch rows equal to transformers' image processor per frame laid out as its video processor
lays them out; `<video>` -> <|vision_start|><|video_pad|>x n<|vision_end|>; packed batches
mixing videos and images give transformers' logits per record (Qwen2.5-VL with its fps time
steps); settings from the video processor config; errors naming the record and the frame."""
from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
from PIL import Image

import mllm_tune as mt
from mllm_tune.data import qwen_images as qi
from mllm_tune.data import qwen_videos as qv
from mllm_tune.data.errors import DataError
from mllm_tune.data.loader import make_batches
from mllm_tune.data.pipeline import SamplePreparer
from tests.helpers import qwen_video as qvid
from tests.helpers import qwen_vl_tiny as qt
from tests.helpers.data import image_bytes, packed_cfg, write_llava_dataset
from tests.helpers.hf_parity import check_eval_set, check_packed_samples


def _frames(n, w, h, seed=0):
  return [Image.open(io.BytesIO(image_bytes(w, h, seed=seed + k))) for k in range(n)]


@pytest.mark.parametrize("n,wh", [(5, (60, 40)), (4, (84, 56)), (1, (30, 200))])
def test_video_rows_equal_the_image_processor_per_frame_in_video_layout(n, wh):
  """An odd frame count repeats the last frame; one frame fills both temporal slots."""
  proc = qt.image_processor()
  spec = qi.QwenImageSpec(min_pixels=qt.MIN_PIXELS, max_pixels=qt.MAX_PIXELS)
  frames = _frames(n, *wh)
  patches, grid = qv.video_patches(frames, spec)
  ref_rows, ref_grid = qvid.hf_video_rows(frames, proc)
  assert tuple(grid) == tuple(ref_grid) and grid[0] == -(-n // 2)
  assert patches.shape == (ref_rows.shape[0], 2, 14, 14, 3) and patches.dtype == np.uint8
  np.testing.assert_allclose(qi.patch_rows(patches, spec), ref_rows, atol=1e-5, rtol=0)
  assert qv.video_tokens(n, (wh[1], wh[0]), spec) == ref_rows.shape[0] // 4


def test_video_spec_from_its_config_or_the_image_processors(tmp_path):
  d = str(tmp_path)
  with open(os.path.join(d, "preprocessor_config.json"), "w") as f:
    json.dump({"image_processor_type": "Qwen2VLImageProcessor", "min_pixels": 3136,
               "max_pixels": 12845056, "patch_size": 14}, f)
  spec = qv.video_spec_from_pretrained(d)  # no video config: the image processor's, as HF
  assert (spec.min_pixels, spec.max_pixels) == (3136, 12845056)
  with open(os.path.join(d, qv.VIDEO_FILE), "w") as f:
    json.dump({"video_processor_type": "Qwen2VLVideoProcessor", "patch_size": 14,
               "size": {"shortest_edge": 4096, "longest_edge": 8192}}, f)
  spec = qv.video_spec_from_pretrained(d)
  assert (spec.min_pixels, spec.max_pixels) == (4096, 8192)
  with open(os.path.join(d, qv.VIDEO_FILE), "w") as f:
    json.dump({"video_processor_type": "Qwen2VLVideoProcessor"}, f)
  spec = qv.video_spec_from_pretrained(d)  # the video class's own defaults
  assert (spec.min_pixels, spec.max_pixels) == (128 * 28 * 28, 768 * 28 * 28)
  spec = qv.video_spec_from_pretrained(d, qwen3=True)
  assert (spec.min_pixels, spec.max_pixels) == (128 * 32 * 32, 768 * 32 * 32)
  assert spec.patch_size == 16 and spec.mean == (0.5,) * 3
  with open(os.path.join(d, "processor_config.json"), "w") as f:  # transformers reads it first
    json.dump({"video_processor": {"size": {"shortest_edge": 1, "longest_edge": 2}}}, f)
  assert qv.video_spec_from_pretrained(d).max_pixels == 2
  with open(os.path.join(d, "processor_config.json"), "w") as f:
    json.dump({"video_processor": {"cap_pixels_per_frame": True}}, f)
  with pytest.raises(ValueError, match="processor_config.json: video_processor: "
                                       "cap_pixels_per_frame=True .* is not supported"):
    qv.video_spec_from_pretrained(d)
  os.remove(os.path.join(d, "processor_config.json"))
  with open(os.path.join(d, qv.VIDEO_FILE), "w") as f:
    json.dump({"size": {"shortest_edge": 4096}, "image_mean": [1, 2]}, f)
  with pytest.raises(ValueError, match=rf"{qv.VIDEO_FILE}: 'image_mean' must have 3 values"):
    qv.video_spec_from_pretrained(d)


VIDEO_MAX_PIXELS = 28 * 28 * 4  # the video processor's budget: smaller than the images' (24)


def _write_video_config(d: str, extra: dict | None = None, **size) -> None:
  with open(os.path.join(d, qv.VIDEO_FILE), "w") as f:
    json.dump({"video_processor_type": "Qwen2VLVideoProcessor", "size": size, **(extra or {})},
              f)


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def video_env(request, tmp_path_factory):
  """The tiny model directory with a video processor config of its own (a smaller budget than
  the images'), the `video_records` written as LLaVA JSON, and the reference encoder."""
  family = request.param
  root = tmp_path_factory.mktemp(family)
  d, hf_model, proc = qt.model_dir(str(root), family)
  _write_video_config(d, shortest_edge=qt.MIN_PIXELS, longest_edge=VIDEO_MAX_PIXELS)
  model, params = mt.load_pretrained(d)
  records, files = qvid.video_records()
  path = write_llava_dataset(str(root / "data"), records, files)
  folders = {"clipA": sorted(k for k in files if k.startswith("clipA/"))}
  encode = qvid.encode_video_record(proc, files, folders, family == "qwen2_5_vl",
                                    frame_processor=qt.image_processor(
                                        max_pixels=VIDEO_MAX_PIXELS))
  return family, d, hf_model, proc, model, params, path, records, encode


@pytest.mark.parametrize("groups", [1, 2])
def test_packed_video_batches_give_transformers_logits_per_record(video_env, groups):
  """Also with the patch buffer in 2 row-group blocks (`data.image_groups`), as data-parallel
  training lays it out."""
  family, d, hf_model, _, model, params, path, records, encode = video_env
  it = make_batches(packed_cfg(path, os.path.join(os.path.dirname(path), "images"),
                               batch_size=2, seq_len=200, image_groups=groups), d, model.config)
  batch = next(it)
  assert batch["pixel_values"].ndim == (3 if groups == 2 else 2)
  refs = {tuple(e["input_ids"][0].tolist()): e for e in map(encode, records)}
  checked, _ = check_packed_samples(model, params, batch, refs, hf_model)
  assert checked == 4 and int(batch["segment_ids"].max()) >= 2  # all four, packed
  video_id = model.config.video_token_id
  assert (batch["input_ids"] == video_id).sum() == 6 + 4  # 3 and 2 frame pairs of 28 x 56
  if family == "qwen2_5_vl":  # 1 fps: time steps of tokens_per_second * 2 s = 4
    r, c = np.argwhere(batch["input_ids"] == video_id)[0]
    cols = np.flatnonzero((batch["input_ids"][r] == video_id)
                          & (batch["segment_ids"][r] == batch["segment_ids"][r, c]))
    t = batch["positions"][0, r, cols]
    assert sorted(set((t - t.min()).tolist())) == [0, 4, 8]


def test_fisher_split_of_a_video_batch_gives_its_logits(video_env):
  """Fisher / MAS / grad_topk cut each sample out of a packed batch with its own patch rows
  (video rows included), vision ids and (3, L) positions: same logits, same NLL."""
  import types

  import jax
  import jax.numpy as jnp
  from mllm_tune.models import model_kwargs
  from tests.helpers import method_steps as ms
  _, d, _, _, model, params, path, _, _ = video_env
  it = make_batches(packed_cfg(path, os.path.join(os.path.dirname(path), "images"),
                               batch_size=2, seq_len=200), d, model.config)
  batch = {k: jnp.asarray(v) for k, v in next(it).items()}
  env = types.SimpleNamespace(model=model, params=params, batch=batch, logits=jax.jit(
      lambda p, b: model.apply({"params": p}, b["input_ids"], **model_kwargs(b))))
  examples, _ = ms.check_sample_split(env, model.config.vision.merge_unit, min_samples=4)
  assert len(examples) == 4 and sum(len(e["images"]) for e in examples) == int(
      (batch["vision_segment_ids"] > 0).sum())


def test_video_prompt_ids_equal_the_processors_generation_prompt(video_env):
  """The in-run evaluation's prompt of a record with an image and a video: the turns before
  its answer with the template's generation prompt, both expanded as the processor expands
  them."""
  _, d, _, _, model, _, path, records, encode = video_env
  from mllm_tune.data.sources import LlavaJsonSource
  prepare = SamplePreparer.from_pretrained(d, model.config, 400)
  rec = LlavaJsonSource(path, os.path.join(os.path.dirname(path), "images"))[1]
  prompt = prepare.prompt_ids(rec, prepare(rec))
  head = dict(records[1], conversations=records[1]["conversations"][:1])
  ref = encode(head, add_generation_prompt=True)["input_ids"][0].numpy()
  np.testing.assert_array_equal(prompt, ref)
  assert (prompt == model.config.video_token_id).sum() == 4


def test_video_fps_and_pixel_budget_settings(video_env):
  """data.video_fps sets the rate of records without "fps" (Qwen2.5-VL's time steps: 2 tokens/s
  x 2 frames / fps; Qwen2-VL counts frame pairs); data.video_max_pixels the per-frame budget."""
  family, d, _, _, model, _, path, _, _ = video_env
  from mllm_tune.data.pipeline import qwen_preparer
  from mllm_tune.data.sources import LlavaJsonSource
  rec = LlavaJsonSource(path, os.path.join(os.path.dirname(path), "images"))[1]  # no fps
  video_id = model.config.video_token_id

  def time_steps(**kw):
    s = qwen_preparer(d, model.config, 400, **kw)(rec)
    t = s.mrope_positions[0][s.tokens.input_ids == video_id]
    return sorted(set((t - t.min()).tolist())), int((s.tokens.input_ids == video_id).sum())
  assert time_steps() == ([0, 2] if family == "qwen2_5_vl" else [0, 1], 4)
  assert time_steps(video_fps=4.0) == ([0, 1], 4)
  assert time_steps(video_options=dict(max_pixels=28 * 28 * 2))[1] == 2  # 28x28: 1 a pair
  with pytest.raises(ValueError, match="video_fps 0 must be a positive number"):
    qwen_preparer(d, model.config, 400, video_fps=0)


def test_eval_sets_with_videos_give_transformers_logits_for_rows_and_prompts(video_env):
  """In-run evaluation sets (`eval/vqa_sets.py`) of records with videos: the training rows and
  the generation prompts (their own M-RoPE ids, Qwen2.5-VL's time steps) give transformers'
  logits on each record's reference inputs; images and videos share the per-row patch blocks."""
  from mllm_tune.data.sources import LlavaJsonSource
  from mllm_tune.eval import vqa_sets
  _, d, hf_model, _, model, params, path, records, encode = video_env
  prepare = SamplePreparer.from_pretrained(d, model.config, 400)
  src = LlavaJsonSource(path, os.path.join(os.path.dirname(path), "images"))
  arr = vqa_sets.prepare(src, prepare)
  assert arr.pixels.ndim == 6  # (records, patches, T, p, p, 3)
  heads = [dict(r, conversations=r["conversations"][:1]) for r in records]
  check_eval_set(model, params, hf_model, arr, prepare.qwen_spec,
                 [(encode(r), encode(h, True)) for r, h in zip(records, heads)])


def test_a_string_only_template_gets_the_video_text_inline(video_env):
  """With ChatML (string contents) `<video>` is replaced by <|vision_start|><|video_pad|>
  <|vision_end|> in the text, the pad then repeated per the video's tokens."""
  _, d, _, proc, model, _, path, records, _ = video_env
  from mllm_tune.data.pipeline import qwen_preparer
  from mllm_tune.data.sources import LlavaJsonSource
  from mllm_tune.data.templates import CHATML
  rec = LlavaJsonSource(path, os.path.join(os.path.dirname(path), "images"))[0]
  sample = qwen_preparer(d, model.config, 400, template="chatml")(rec)
  tok = proc.tokenizer
  forms = {"<video>": "<|vision_start|><|video_pad|><|vision_end|>"}
  messages = [{"role": {"human": "user", "gpt": "assistant"}[t["from"]],
               "content": t["value"].replace("<video>", forms["<video>"])}
              for t in records[0]["conversations"]]
  ids = tok(tok.apply_chat_template(messages, chat_template=CHATML, tokenize=False))["input_ids"]
  at = ids.index(model.config.video_token_id)
  ref = ids[:at] + [model.config.video_token_id] * 6 + ids[at + 1:]  # 3 pairs x 2 tokens
  np.testing.assert_array_equal(sample.tokens.input_ids, ref)


def test_video_errors_name_the_record_and_frame(video_env, tmp_path):
  _, d, _, _, model, _, path, _, _ = video_env
  prepare = SamplePreparer.from_pretrained(d, model.config, 400)
  turns = [{"from": "human", "value": "<video> hi"}, {"from": "gpt", "value": "a"}]
  frames = [image_bytes(60, 40, seed=1), image_bytes(60, 44, seed=2)]
  with pytest.raises(DataError, match=r"rec: video clip \.\.\.: frame 1 is 60x44 \(WxH\) but "
                                      r"frame 0 is 60x40"):
    prepare({"conversations": turns, "videos": [frames], "video_names": [["clip", "b"]],
             "where": "rec"})
  with pytest.raises(DataError, match=r"rec: 1 <video> placeholder\(s\) in the conversation "
                                      r"but 0 video"):
    prepare({"conversations": turns, "where": "rec"})
  with pytest.raises(DataError, match="rec: video v frame 0: cannot decode image"):
    prepare({"conversations": turns, "videos": [[b"junk"]], "video_names": ["v"],
             "where": "rec"})
  with pytest.raises(DataError, match=r"rec: video v: fps -1 must be a positive number"):
    prepare({"conversations": turns, "videos": [frames[:1]], "video_names": ["v"],
             "video_fps": [-1], "where": "rec"})
  from mllm_tune.data.sources import LlavaJsonSource, validate_record
  with pytest.raises(DataError, match=r"f:3 \(id=x\): field 'video' must be a folder"):
    validate_record({"id": "x", "video": 3, "conversations": turns}, "f:3", 0)
  with pytest.raises(DataError, match=r"field 'fps' must be a positive number, got 'a'"):
    validate_record({"id": "x", "video": "c", "fps": "a", "conversations": turns}, "f:3", 0)
  bad = write_llava_dataset(str(tmp_path), [{"id": "m", "video": "nope",
                                              "conversations": turns}], {})
  with pytest.raises(DataError, match=r"\(id=m\): video frame folder not found: .*nope"):
    LlavaJsonSource(bad, str(tmp_path / "images"))[0]


def test_llava_models_refuse_video_records(tmp_path):
  from tests.helpers.data import llava_model_dir
  d = llava_model_dir(str(tmp_path))
  model, _ = mt.load_pretrained(d)
  prepare = SamplePreparer.from_pretrained(d, model.config, 100, template="chatml")
  turns = [{"from": "human", "value": "<video> hi"}, {"from": "gpt", "value": "a"}]
  with pytest.raises(DataError, match="rec: a video, but this model's data pipeline takes "
                                      "images only"):
    prepare({"conversations": turns, "videos": [[image_bytes(8, 8)]], "where": "rec"})


def test_qwen3_vl_video_records_get_timestamped_frame_runs_with_transformers_logits(tmp_path):
  """Qwen3-VL: the whole clip's pixel budget, `<t seconds>` + a run per frame pair (the
  processor's timestamps), one-frame M-RoPE grids; packed batches give transformers' logits
  per record (deepstack and position taps per frame), and the prompts equal the processor's."""
  d, hf_model, proc = qt.model_dir(str(tmp_path), "qwen3_vl")
  budget = (32 * 32 * 2, 32 * 32 * 12)  # the clip's, its own config (the images' differs)
  _write_video_config(d, dict(patch_size=16, image_mean=list(qi.CLIP_MEAN),
                             image_std=list(qi.CLIP_STD)),
                      shortest_edge=budget[0], longest_edge=budget[1])
  model, params = mt.load_pretrained(d)
  records, files = qvid.video_records()
  path = write_llava_dataset(str(tmp_path / "data"), records, files)
  folders = {"clipA": sorted(k for k in files if k.startswith("clipA/"))}
  encode = qvid.encode_video_record(proc, files, folders, False, qwen3=True, budget=budget)
  refs = {tuple(e["input_ids"][0].tolist()): e for e in map(encode, records)}
  images = str(tmp_path / "data" / "images")
  batch = next(make_batches(packed_cfg(path, images, batch_size=2, seq_len=200), d,
                            model.config))
  checked, _ = check_packed_samples(model, params, batch, refs, hf_model)
  assert checked == 4
  tok = proc.tokenizer
  text = tok.decode(batch["input_ids"][batch["input_ids"] != model.config.video_token_id])
  assert "<0.5 seconds><|vision_start|><|vision_end|><2.5 seconds>" in text  # 1 fps, 5 frames
  from mllm_tune.data.sources import LlavaJsonSource
  prepare = SamplePreparer.from_pretrained(d, model.config, 400)
  rec = LlavaJsonSource(path, images)[1]
  head = dict(records[1], conversations=records[1]["conversations"][:1])
  np.testing.assert_array_equal(prepare.prompt_ids(rec, prepare(rec)),
                                encode(head, add_generation_prompt=True)["input_ids"][0].numpy())
  with pytest.raises(DataError, match=r"rec: video v: 1 frame\(s\): Qwen3-VL videos need at "
                                      "least 2"):
    prepare({"conversations": [{"from": "human", "value": "<video> hi"},
                               {"from": "gpt", "value": "a"}],
             "videos": [[image_bytes(60, 40)]], "video_names": ["v"], "where": "rec"})


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_truncation_inside_a_video_drops_the_whole_video(family, tmp_path):
  """A cut inside a video (Qwen3-VL: inside any of its frame runs) moves to the video's first
  token run: the sample keeps the earlier answer and none of the video's patches or tokens."""
  from mllm_tune.data.pipeline import qwen_preparer
  d, _, _ = qt.model_dir(str(tmp_path), family)
  model, _ = mt.load_pretrained(d)
  turns = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "a cat"},
           {"from": "human", "value": "<video> and?"}, {"from": "gpt", "value": "blue"}]
  rec = {"conversations": turns, "videos": [[image_bytes(60, 40, seed=k) for k in range(5)]],
         "video_names": ["v"], "where": "rec"}
  full = qwen_preparer(d, model.config, 400)(rec)
  vid = model.config.video_token_id
  cols = np.flatnonzero(full.tokens.input_ids == vid)
  assert full.grids.shape == (1, 3) and len(cols) == 6 and full.pixels.ndim == 5
  kept = qwen_preparer(d, model.config, int(cols[-1]) + 1)(rec)  # the cut right after it
  assert len(kept.tokens) == cols[-1] + 1 and kept.pixels.shape == full.pixels.shape
  assert (kept.tokens.input_ids == vid).sum() == 6 and kept.grids.shape == (1, 3)
  cut = qwen_preparer(d, model.config, int(cols[-1]))(rec)  # inside the last run
  assert len(cut.tokens) == cols[0] and cut.truncated_from == len(full.tokens)
  assert not (cut.tokens.input_ids == vid).any() and cut.pixels.shape[0] == 0
  assert len(cut.grids) == 0 and cut.tokens.loss_mask.any()
  np.testing.assert_array_equal(cut.tokens.input_ids, full.tokens.input_ids[:cols[0]])


def test_frame_folders_are_read_in_natural_order(tmp_path):
  from mllm_tune.data.sources import read_frames
  os.makedirs(tmp_path / "clip")
  for name in ("10.png", "2.png", "1.png", "notes.txt"):
    (tmp_path / "clip" / name).write_bytes(name.encode())
  assert read_frames(str(tmp_path), "clip", "rec") == [b"1.png", b"2.png", b"10.png"]
