"""Config -> batch iterator: the one call a trainer needs (`configs/data/llava_instruct.py`).

    batches = make_batches(cfg.data, model_dir, model.config)   # Prefetcher or BatchIterator
    batch = next(batches); state = batches.get_state(); batches.set_state(state)

`cfg.data` fields (ConfigDict or dict; defaults in `DEFAULTS`): kind ("llava_json" | "tfds" |
"offline": an `offline_vqa` source named by `source`, with split, num_records, image_size and
source_seed),
json_path, image_folder, tfds_dir (kind "tfds": converted there once from json_path), template
(None = the tokenizer's), seq_len (row length = max sample length), batch_size (rows per host),
packing, bucket_lengths, max_images (0 = `suggest_max_images` from the first 512 samples),
overflow, on_error, aspect, seed, shuffle, num_epochs, num_workers, prefetch (0 = none).
Anyres models (LLaVA-NeXT / OneVision): max_images is the crop budget per batch (0 = from the
first 512 records' image sizes, and at least the most crops one of them needs), crop_buckets the
allowed crop counts (default: the budget's quarters, so at most 4 compiled shapes per row
length), max_image_tokens refuses images that would yield more tokens (0 = no limit).
Qwen2-VL / 2.5-VL: max_images is the *patch* budget per batch (0 = from the first 512 records'
image sizes, at least the most patches one of them needs; rounded up to a multiple of 64 for
m = 2), crop_buckets the allowed patch counts (default: the budget's quarters, multiples of 64),
min_pixels / max_pixels override the image processor's (0 = the checkpoint's), out_of_budget
"resize" (transformers' rule) or "refuse" (images outside [min_pixels, max_pixels] are bad
records), max_image_tokens as above. Videos (records with a "video" field of frames, Qwen2-VL /
2.5-VL; `data/qwen_videos.py`): video_min_pixels / video_max_pixels override the video
processor's per-frame budget (0 = the checkpoint's), video_fps is the frame rate of records
without their own "fps" (Qwen2.5-VL's time steps); a video's patches count in max_images.
image_groups G: the data-parallel shards of this host's rows (`mllm-tune train` sets it when left
0), over which `Trainer.put_batch` splits the image buffer. Qwen2-VL: the rows form G groups with
max_images / G patches and a patch block each (`data/qwen_batch.py`), so each device encodes its
own rows' images (a sample with more patches than a group holds is a skipped record); anyres:
probed crop budgets and default buckets are multiples of G; LLaVA-1.5: a probed slot count is
rounded down to a multiple of G (each device encodes an equal share of the slots).
Hosts read disjoint shards (`jax.process_index()` of `jax.process_count()`). With kind "tfds"
on several hosts, convert once beforehand (`sources.build_tfds`): hosts must not build it at
the same time.
"""
from __future__ import annotations

import jax
import numpy as np

from mllm_tune.data.batching import BatchIterator, MicroBatches, Prefetcher
from mllm_tune.data.conversation import ChatTokenizer, load_tokenizer
from mllm_tune.data.errors import DataError
from mllm_tune.data.anyres_batch import quarter_buckets
from mllm_tune.data.packing import BatchSpec, suggest_max_images
from mllm_tune.data import qwen_samples
from mllm_tune.data import qwen_videos as qv
from mllm_tune.data.pipeline import SamplePreparer
from mllm_tune.data.sources import LlavaJsonSource, TfdsSource, build_tfds
from mllm_tune.models import anyres
from mllm_tune.models.qwen_vl_config import QwenVLConfig

DEFAULTS = dict(kind="llava_json", json_path="", image_folder=None, tfds_dir="", template=None,
                seq_len=2048, batch_size=8, packing=True, bucket_lengths=(), max_images=0,
                overflow="truncate", on_error="skip", aspect=None, seed=0, shuffle=True,
                num_epochs=None, num_workers=0, prefetch=2, source="", split="train",
                num_records=0, image_size=32, source_seed=0, crop_buckets=(),
                max_image_tokens=0, min_pixels=0, max_pixels=0, out_of_budget="resize",
                image_groups=0, video_min_pixels=0, video_max_pixels=0, video_fps=2.0,
                micro_batches=1)


def _options(cfg) -> dict:
  given = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
  unknown = sorted(set(given) - set(DEFAULTS))
  if unknown:
    raise ValueError(f"data config: unknown field(s) {unknown}; known: {sorted(DEFAULTS)}")
  return {**DEFAULTS, **given}


def _probe_max_images(source, prepare, o: dict, n: int = 512) -> tuple[int, int]:
  """(`suggest_max_images`, the most images of one record) from the token lengths and image
  counts of the first n records."""
  lengths, images = [], []
  for i in range(min(len(source), n)):
    try:
      rec = source[i]
      tokens = prepare.chat.encode(rec["conversations"], len(rec["images"]), rec["where"])
    except DataError:
      continue  # reported when the iterator reaches it
    lengths.append(min(len(tokens), o["seq_len"]))
    images.append(len(rec["images"]))
  return suggest_max_images(lengths, images, o["batch_size"], o["seq_len"],
                            prepare.chat.image_seq_len, o["packing"]), max(images, default=0)


def _probe_budget(source, prepare, o: dict, measure, n: int = 512) -> tuple[int, int]:
  """(suggested image budget per batch, most units of one sample) from the first n records,
  reading only image headers. `measure(sizes_hw, videos) -> (image tokens per image, units,
  video_tokens, video_texts)` (the last two as `ChatTokenizer.encode` takes them): units are
  what the batch budget counts (anyres crops, Qwen2-VL patches); videos are (frames, first
  frame's (H, W), fps or None)."""
  import io
  from PIL import Image
  lengths, units, most = [], [], 1
  for i in range(min(len(source), n)):
    try:
      rec = source[i]
      sizes = [Image.open(io.BytesIO(b)).size[::-1] for b in rec["images"]]
      fps = rec.get("video_fps") or [None] * len(rec.get("videos") or [])
      videos = [(len(v), Image.open(io.BytesIO(v[0])).size[::-1], f)
                for v, f in zip(rec.get("videos") or [], fps)]
      counts, u, v_tokens, v_texts = measure(sizes, videos)
      tokens = prepare.chat.encode(rec["conversations"], len(sizes), rec["where"],
                                   image_tokens=counts, video_tokens=v_tokens,
                                   video_texts=v_texts)
    except (DataError, OSError, ValueError):
      continue  # reported when the iterator reaches it
    lengths.append(min(len(tokens), o["seq_len"]))
    units.append(u)
    most = max(most, u)
  if not o["packing"]:
    return max(o["batch_size"] * most, 1), most
  want = int(round(o["batch_size"] * o["seq_len"] * sum(units) / max(sum(lengths), 1)))
  return max(want, most, 1), most


def _probe_crops(source, prepare, o: dict) -> tuple[int, int]:
  """`_probe_budget` in anyres crops."""
  from mllm_tune.data import anyres_images as ai
  spec = prepare.anyres_spec

  def measure(sizes, videos):
    flags = ai.anyres_flags(spec.family, [len(sizes)])
    v_tokens = [anyres.video_tokens(n, spec.feature_side) for n, _, _ in videos]
    return ([spec.image_tokens(hw, f) for hw, f in zip(sizes, flags)],
            sum(spec.num_crops(hw, f) for hw, f in zip(sizes, flags))
            + sum(n for n, _, _ in videos), v_tokens, None)
  return _probe_budget(source, prepare, o, measure)


def make_source(o: dict):
  if o["kind"] == "llava_json":
    return LlavaJsonSource(o["json_path"], o["image_folder"], o["on_error"])
  if o["kind"] == "tfds":
    dataset_dir, _ = build_tfds(o["json_path"], o["tfds_dir"], o["image_folder"], o["on_error"])
    return TfdsSource(dataset_dir)
  if o["kind"] == "offline":  # the offline benchmark's generated sets (data/offline_vqa.py)
    from mllm_tune.data import offline_vqa as ov
    if o["source"] == "digits":
      return ov.DigitsSource(o["split"], o["image_size"], o["source_seed"])
    try:
      return ov.make_source(o["source"], o["split"], o["image_size"], o["num_records"] or None,
                            o["source_seed"])
    except ValueError as e:
      raise ValueError(f"data config: source={o['source']!r}: {e}") from e
  raise ValueError(f"data config: kind={o['kind']!r}: choose llava_json, tfds or offline")


def make_batches(cfg, model_dir: str, model_config):
  """Source + preparer (tokenizer and image processor of `model_dir`) + batch spec -> iterator.

  `model_config` is the model's `LlavaConfig` (a `CausalLMConfig` means text-only data).

  `micro_batches` A > 1 (`train.grad_accum`): each batch is A micro-batches of batch_size / A
  rows stacked on a leading axis (`MicroBatches`), every one packed on its own with its own
  image buffer, the image budget sized for batch_size / A rows; they share one shape (the
  longest row length `seq_len`, the budget as the only image bucket), so they can stack."""
  o = _options(cfg)
  micro = int(o["micro_batches"] or 1)
  if micro > 1:
    if o["batch_size"] % micro:
      raise ValueError(f"data config: batch_size={o['batch_size']} (rows per host) is not "
                       f"divisible by micro_batches={micro} (train.grad_accum)")
    o = {**o, "batch_size": o["batch_size"] // micro, "bucket_lengths": ()}
  it = _batches({**o, "prefetch": 0}, make_source(o), model_dir, model_config)
  if micro > 1:
    it = MicroBatches(it, micro)
  return Prefetcher(it, o["prefetch"]) if o["prefetch"] else it


def _one_shape(o: dict) -> bool:
  """Whether every batch must have one image-buffer shape: several hosts (parts of one global
  buffer) or micro-batches (stacked)."""
  return jax.process_count() > 1 or int(o["micro_batches"] or 1) > 1


def _batches(o: dict, source, model_dir: str, model_config):
  multimodal = hasattr(model_config, "image_token_id")
  if isinstance(model_config, QwenVLConfig):
    return _qwen_batches(o, source, model_dir, model_config)
  if multimodal and model_config.anyres:
    return _anyres_batches(o, source, model_dir, model_config)
  if multimodal:
    prepare = SamplePreparer.from_pretrained(model_dir, model_config, o["seq_len"],
                                             o["template"], o["overflow"], o["aspect"])
    seq, image_id = model_config.image_seq_len, model_config.image_token_id
  else:
    chat = ChatTokenizer(load_tokenizer(model_dir), -1, 0, o["template"])
    prepare, seq, image_id = SamplePreparer(chat, None, o["seq_len"], o["overflow"]), 0, -1
  max_images = o["max_images"]
  if multimodal and not max_images:
    max_images, most = _probe_max_images(source, prepare, o)
    g = max(1, int(o["image_groups"] or 1))
    if max_images - max_images % g >= max(most, 1):  # slots split evenly over the row shards
      max_images -= max_images % g  # (rounded down: `packing.max_image_slots` stays met)
  pad_id = getattr(prepare.chat.tokenizer, "pad_token_id", None) or 0
  spec = BatchSpec(batch_size=o["batch_size"], max_len=o["seq_len"], packing=o["packing"],
                   bucket_lengths=tuple(o["bucket_lengths"]), max_images=max_images,
                   image_seq_len=seq, image_token_id=image_id, image_hw=prepare.image_hw,
                   pad_id=pad_id)
  it = BatchIterator(source, prepare, spec, prepare.image_spec, seed=o["seed"],
                     shuffle=o["shuffle"], num_epochs=o["num_epochs"], on_error=o["on_error"],
                     shard_index=jax.process_index(), shard_count=jax.process_count(),
                     num_workers=o["num_workers"])
  return Prefetcher(it, o["prefetch"]) if o["prefetch"] else it


def _anyres_batches(o: dict, source, model_dir: str, model_config):
  prepare = SamplePreparer.from_pretrained(model_dir, model_config, o["seq_len"], o["template"],
                                           o["overflow"])
  if o["max_image_tokens"]:
    import dataclasses
    prepare.anyres_spec = dataclasses.replace(prepare.anyres_spec,
                                              max_image_tokens=int(o["max_image_tokens"]))
  g = max(1, int(o["image_groups"] or 1))  # crop counts split evenly over the row shards
  budget = o["max_images"] or -(-_probe_crops(source, prepare, o)[0] // g) * g
  buckets = tuple(o["crop_buckets"]) or quarter_buckets(budget, g)
  if _one_shape(o):  # hosts' crops are parts of one global buffer / micro-batches stack
    buckets = (max(buckets),)
  pad_id = getattr(prepare.chat.tokenizer, "pad_token_id", None) or 0
  spec = BatchSpec(batch_size=o["batch_size"], max_len=o["seq_len"], packing=o["packing"],
                   bucket_lengths=tuple(o["bucket_lengths"]), max_images=budget,
                   image_token_id=model_config.image_token_id, image_hw=prepare.image_hw,
                   video_token_id=prepare.chat.video_token_id,
                   pad_id=pad_id, crop_features=model_config.crop_side ** 2,
                   crop_buckets=buckets)
  it = BatchIterator(source, prepare, spec, prepare.image_spec, seed=o["seed"],
                     shuffle=o["shuffle"], num_epochs=o["num_epochs"], on_error=o["on_error"],
                     shard_index=jax.process_index(), shard_count=jax.process_count(),
                     num_workers=o["num_workers"])
  return Prefetcher(it, o["prefetch"]) if o["prefetch"] else it


def _probe_patches(source, prepare, o: dict) -> tuple[int, int]:
  """`_probe_budget` in Qwen2-VL patches (videos: t * gh * gw each)."""
  spec, v_spec = prepare.qwen_spec, prepare.video_spec
  qwen3 = prepare.video_frame_marks is not None

  def measure(sizes, videos):
    grids = [spec.grid(hw) for hw in sizes]
    v_grids = [qv.video_grid(n, hw, v_spec, qwen3) for n, hw, _ in videos] if v_spec else []
    texts = [qv.video_text(qv.frame_timestamps(n, f or prepare.video_fps,
                                               v_spec.temporal_patch_size),
                           *prepare.video_frame_marks) if qwen3 else None
             for n, _, f in videos]
    v_tokens, v_texts = qwen_samples.video_token_args(v_grids, texts, spec.merge_unit, qwen3)
    units = sum(gh * gw for gh, gw in grids) + sum(int(np.prod(g)) for g in v_grids)
    return [gh * gw // spec.merge_unit for gh, gw in grids], units, v_tokens, v_texts
  return _probe_budget(source, prepare, o, measure)


def _qwen_batches(o: dict, source, model_dir: str, model_config):
  from mllm_tune.data.pipeline import qwen_preparer
  from mllm_tune.data.qwen_batch import patch_buckets, round_budget
  if o["out_of_budget"] not in ("resize", "refuse"):
    raise ValueError(f"data config: out_of_budget={o['out_of_budget']!r}: choose resize or "
                     "refuse")
  prepare = qwen_preparer(model_dir, model_config, o["seq_len"], o["template"], o["overflow"],
                          min_pixels=o["min_pixels"] or None,
                          max_pixels=o["max_pixels"] or None, out_of_budget=o["out_of_budget"],
                          max_image_tokens=o["max_image_tokens"] or None,
                          video_options=dict(min_pixels=o["video_min_pixels"] or None,
                                             max_pixels=o["video_max_pixels"] or None),
                          video_fps=o["video_fps"])
  mu, groups = model_config.vision.merge_unit, max(1, int(o["image_groups"] or 1))
  if o["batch_size"] % groups:
    raise ValueError(f"data config: image_groups={groups} does not divide batch_size="
                     f"{o['batch_size']} (rows per host)")
  given = tuple(int(c) for c in o["crop_buckets"])
  if given and not o["max_images"]:
    budget = max(given)
  elif o["max_images"]:
    budget = round_budget(o["max_images"], mu * groups)
  else:  # every group must hold the largest sample
    want, most = _probe_patches(source, prepare, o)
    budget = round_budget(max(want, groups * most), mu * groups)
  buckets = given or patch_buckets(budget, mu * groups)
  if _one_shape(o):  # hosts' patches are parts of one global buffer / micro-batches stack
    buckets = (max(buckets),)
  pad_id = getattr(prepare.chat.tokenizer, "pad_token_id", None) or 0
  spec = BatchSpec(batch_size=o["batch_size"], max_len=o["seq_len"], packing=o["packing"],
                   bucket_lengths=tuple(o["bucket_lengths"]), max_images=budget,
                   image_token_id=model_config.image_token_id, image_hw=prepare.image_hw,
                   video_token_id=model_config.video_token_id if prepare.video_spec else -1,
                   pad_id=pad_id, crop_buckets=buckets, merge_unit=mu,
                   window_merge=prepare.window_merge, image_groups=groups)
  it = BatchIterator(source, prepare, spec, prepare.image_spec, seed=o["seed"],
                     shuffle=o["shuffle"], num_epochs=o["num_epochs"], on_error=o["on_error"],
                     shard_index=jax.process_index(), shard_count=jax.process_count(),
                     num_workers=o["num_workers"])
  return Prefetcher(it, o["prefetch"]) if o["prefetch"] else it
