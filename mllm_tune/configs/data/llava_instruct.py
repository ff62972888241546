"""Data settings for LLaVA-format instruction tuning (`mllm_tune.data.loader.make_batches`).

Use as `cfg.data` of an experiment: `c.data = llava_instruct.get_config()`, then override
`--config.data.json_path=... --config.data.image_folder=...`. See `mllm_tune/data/loader.py`.
"""
import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.kind = "llava_json"           # llava_json | tfds (converted once into tfds_dir)
  c.json_path = ""                # LLaVA .json list or .jsonl
  c.image_folder = ""             # image paths in the records are relative to it
  c.tfds_dir = ""
  c.template = ml_collections.FieldReference(None, field_type=str)  # None: the tokenizer's
  c.seq_len = 2048                # row length; longer samples follow `overflow`
  c.batch_size = 8                # rows per host
  c.packing = True
  c.bucket_lengths = ()           # padding mode: allowed row lengths (last = seq_len)
  c.max_images = 0                # image slots per batch; 0: suggested from the data
  #                                 (anyres: crops, Qwen2-VL: patches per batch)
  c.crop_buckets = ()             # anyres / Qwen2-VL: allowed crop / patch counts (): quarters
  c.max_image_tokens = 0          # anyres / Qwen2-VL: refuse larger images (0: no limit)
  c.min_pixels = 0                # Qwen2-VL: smart_resize budget (0: the image processor's)
  c.max_pixels = 0
  c.out_of_budget = "resize"      # Qwen2-VL: resize (transformers) | refuse images outside
  c.video_min_pixels = 0          # Qwen-VL videos (frames): smart_resize budget per frame
  c.video_max_pixels = 0          #   (Qwen3-VL: per clip; 0: the video processor's)
  c.video_fps = 2.0               # rate of records' frames without their own "fps" (Qwen2.5-VL
  #                                 time steps, Qwen3-VL timestamps)
  c.image_groups = 0              # data-parallel shards of a host's rows (0: from the mesh); image
  #                                 buffers split over them (Qwen2-VL: one patch block each)
  c.overflow = "truncate"         # truncate | drop | fail
  c.on_error = "skip"             # skip (count and report) | raise
  c.aspect = ml_collections.FieldReference(None, field_type=str)  # None: processor's; pad
  c.seed = 0
  c.shuffle = True
  c.num_epochs = ml_collections.FieldReference(None, field_type=int)  # None: endless
  c.num_workers = 2               # threads decoding / resizing images
  c.prefetch = 2                  # batches prepared ahead in a background thread
  return c
