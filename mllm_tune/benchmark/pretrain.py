"""Stage 0 of the benchmark: a tiny LLaVA (or Qwen2.5-VL) pre-trained on the general mix, cached
on disk.

The cache key hashes the `model` and `pretrain` config sections and `DATA_VERSION`, so any
change to them builds a new base; an existing base is reused (`ensure_base`). The base is an HF
model directory with its tokenizer and image processor: everything after this stage loads it
through the regular loading code.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile

from mllm_tune.eval import vqa_sets as arrays_lib
from mllm_tune.benchmark import assets
from mllm_tune.benchmark.fit import fit
from mllm_tune.data import offline_vqa as ov

log = logging.getLogger(__name__)
DATA_VERSION = "offline_vqa-1"  # bump when the generator's records change
TEMPLATE = "chatml"
MAX_LEN = 256


def default_config_path() -> str:
  """The benchmark's default config, shipped in the package (`mllm_tune/benchmark/config.py`)."""
  return os.path.join(os.path.dirname(os.path.abspath(__file__)), "config.py")


def resolve_model_source(model_cfg) -> None:
  """`model.source = "bench"` (a training config's `model` section): build (first use) or find
  the pre-trained base of `model.bench_config` (default: this package's config) and point the
  section at it as an HF directory (`source = "hf"`). The CLI calls this before it builds a
  `Trainer`; the training library itself does not know the benchmark."""
  if model_cfg.source != "bench":
    return
  from mllm_tune.train.config_io import load_config
  spec = model_cfg.get("bench_config") or default_config_path()
  model_cfg.path = ensure_base(load_config(spec))
  model_cfg.source = "hf"
  log.info("model.source=bench (%s): the pre-trained base %s", spec, model_cfg.path)


# `model` keys that only one family reads; the other families' keys leave them out, so bases
# built before a family's keys existed keep their key (and "llava" also leaves out `family`)
FAMILY_KEYS = {"llava_onevision": ("crop_size", "vision_aspect_ratio"),
               "qwen2_5_vl": ("window_size",)}


def cache_key(cfg) -> str:
  model = cfg.model.to_dict()
  family = assets.family_of(cfg.model)
  for other, keys in FAMILY_KEYS.items():
    if other != family:
      for k in keys:
        model.pop(k, None)
  if family == "llava":
    model.pop("family", None)
  blob = json.dumps({"model": model, "pretrain": cfg.pretrain.to_dict(),
                     "data": DATA_VERSION}, sort_keys=True)
  return hashlib.sha256(blob.encode()).hexdigest()[:12]


def default_cache_dir() -> str:
  root = os.environ.get("MLLM_TUNE_CACHE") or os.path.join(
      os.path.expanduser("~"), ".cache", "mllm_tune")
  return os.path.join(root, "bench")


def base_dir(cfg) -> str:
  return os.path.join(cfg.cache_dir or default_cache_dir(), f"base-{cache_key(cfg)}")


def general_source(cfg, split: str, num: int):
  return ov.ShapesVqaSource(tuple(cfg.general), split, num, cfg.model.image_size,
                            seed=cfg.data_seed, name="general")


def ensure_base(cfg, progress_factory=None) -> str:
  """The pre-trained base directory for `cfg` (built on first use, then reused)."""
  path = base_dir(cfg)
  if assets.exists(path):
    log.info("reusing the pre-trained base %s", path)
    return path
  from mllm_tune.models import build_model, init_params
  from mllm_tune import tuning
  import jax
  p = cfg.pretrain
  tok = assets.train_tokenizer(cfg.model.vocab_size, assets.family_of(cfg.model))
  mcfg = assets.model_config(cfg.model, tok)
  model = build_model(mcfg)
  params = init_params(model, jax.random.key(p.seed))
  prep = assets.preparer(cfg.model, tok, mcfg, MAX_LEN, TEMPLATE)
  spec = prep.image_spec
  data = arrays_lib.prepare(general_source(cfg, "train", p.num_records), prep, name="general",
                            prompts=False)
  bar = progress_factory(p.steps, "pre-train on the general mix") if progress_factory else None
  result = fit(model, tuning.get("freeze", preset="full"), params, data, spec, steps=p.steps,
               batch_size=p.batch_size, learning_rate=p.learning_rate, seed=p.seed,
               warmup_steps=p.warmup_steps, progress=bar)
  if bar is not None:
    bar.close()
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".base-", dir=os.path.dirname(path))
  try:
    assets.write_model_dir(tmp, model, result.variables["params"], tok, cfg.model.image_size)
    with open(os.path.join(tmp, "pretrain.json"), "w") as f:
      json.dump({"config": {"model": cfg.model.to_dict(), "pretrain": p.to_dict()},
                 "final_loss": result.losses[-1], "step_time_s": result.step_time_s,
                 "data": DATA_VERSION}, f, indent=1)
    os.replace(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return path
