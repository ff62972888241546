"""One sample of a training batch as an example of its own, for per-example gradients
(`fisher.importance`): `split_examples` cuts a training batch (packed rows, image slots shared
across the batch in row-major order) into one row per sample holding its own images; rows are
padded to a common length and image count with dummy image runs in the padding (attention 0, loss
0), the convention of data/packing.py, so each sample's gradient is exactly its own. Anyres
batches keep each sample's crops and pack-table rows; Qwen2-VL / 2.5-VL batches each sample's
patch rows with their vision ids (image segments numbered from 1), its pack-table rows re-based
to them and its (3, L) M-RoPE positions (`data/qwen_batch.py`). `lm_logits_fn` runs the model on
one example."""
from __future__ import annotations

import functools
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from mllm_tune.importance.errors import ImportanceError
from mllm_tune.models.qwen_vl_config import QwenVLConfig

VISION_IDS = ("vision_segment_ids", "vision_pos_hw", "vision_window_ids")  # Qwen, per patch
TOKEN_FIELDS = ("input_ids", "attention_mask", "positions", "segment_ids", "loss_mask")
# (variables, example) -> (logits (T, V), targets (T,), weights (T,)) for one example
LogitsFn = Callable[[dict, dict], tuple[jax.Array, jax.Array, jax.Array]]


@functools.lru_cache(maxsize=8)
def lm_logits_fn(model) -> LogitsFn:
  """One LM example (input_ids, loss_mask, attention_mask, positions, segment_ids (T,);
  optional pixel_values (K, H, W, C)) -> (logits (T-1, V), targets = input_ids[1:],
  weights = loss_mask[1:]): token t is a target predicted from t-1 (step.token_ce).
  One function per model (Flax modules compare by their fields), so that the jitted engine
  built on it (`fisher.importance`) compiles once for every importance of that model, e.g. at
  each in-run refresh of online EWC."""
  def fn(variables, ex):
    kw = {k: ex[k][None] for k in ("attention_mask", "positions", "segment_ids") if k in ex}
    if "positions" in ex and ex["positions"].ndim == 2:  # Qwen's M-RoPE ids (3, T)
      kw["positions"] = ex["positions"][:, None]
    if "pixel_values" in ex:
      kw["pixel_values"] = ex["pixel_values"]
    for k in ("pack_index", "pack_weight", "pack_newline"):  # anyres: position-aligned
      if k in ex:
        kw[k] = ex[k][None]
    kw.update({k: ex[k] for k in VISION_IDS if k in ex})  # Qwen: the example's patch ids
    logits = model.apply(variables, ex["input_ids"][None], **kw)[0]
    return logits[:-1], ex["input_ids"][1:], ex["loss_mask"][1:]
  fn.engines = {}  # fisher.importance's jitted engines of this model, by kind
  return fn


def image_spec(model) -> tuple[int | None, int]:
  """(image token id, tokens per image) of a LLaVA model, (None, 0) for a text-only one; for
  anyres models (whose batches carry pack tables) the second number is the features per crop,
  for Qwen2-VL / 2.5-VL the patches per merged token (m^2)."""
  cfg = getattr(model, "config", None)
  if cfg is None or not hasattr(cfg, "image_token_id"):
    return None, 0
  if isinstance(cfg, QwenVLConfig):
    return int(cfg.image_token_id), int(cfg.vision.merge_unit)
  return int(cfg.image_token_id), int(cfg.crop_tokens if cfg.anyres else cfg.image_seq_len)


def split_examples(batch: dict, image_token_id: int | None = None,
                   image_seq_len: int = 0) -> list[dict[str, np.ndarray]]:
  """A training batch -> one dict per sample (segment of a row) with answer tokens: its
  input_ids, positions, loss_mask (L,) and its own images (n, H, W, C) from the shared slots.
  Batches with a leading grad-accumulation axis (A, B, T) are split per micro-batch. Anyres
  batches (with pack tables; `image_seq_len` = features per crop): each sample keeps its own
  crops and its table rows, re-based to them. Qwen2-VL batches (with vision ids;
  `image_seq_len` = m^2; blocked patch rows (N, K, ...) are read flat): its patch rows and their
  ids, table rows re-based to them, and its (3, L) positions."""
  b = {k: np.asarray(v) for k, v in batch.items()}
  ids = b["input_ids"]
  if ids.ndim == 3:
    out = []
    for a in range(ids.shape[0]):
      sub = {k: v[a] for k, v in b.items() if k != "pixel_values"}
      if "pixel_values" in b:
        px = b["pixel_values"]
        sub["pixel_values"] = px[a] if px.ndim == 5 else px
      out += split_examples(sub, image_token_id, image_seq_len)
    return out
  if "vision_segment_ids" in b and b["vision_segment_ids"].ndim == 2:  # Qwen blocks: flat
    b.update({k: b[k].reshape((-1,) + b[k].shape[2:]) for k in ("pixel_values",) + VISION_IDS
              if k in b})
  rows, length = ids.shape
  mask = b.get("attention_mask", np.ones_like(ids))
  seg = b.get("segment_ids", (mask > 0).astype(np.int32))
  pos = b.get("positions")
  loss = b["loss_mask"] if "loss_mask" in b else mask
  px = b.get("pixel_values")
  with_images = px is not None and image_token_id is not None and image_seq_len > 0
  qwen = with_images and "vision_segment_ids" in b
  anyres = with_images and "pack_index" in b and not qwen
  pos3 = pos is not None and pos.ndim == ids.ndim + 1  # M-RoPE (3, B, T)
  if with_images and not (anyres or qwen):
    is_img = ids == image_token_id
    slot = ((np.cumsum(is_img.reshape(-1)) - 1) // image_seq_len).reshape(ids.shape)
  out = []
  for r in range(rows):
    for s in np.unique(seg[r]):
      if s <= 0:
        continue
      idx = np.nonzero(seg[r] == s)[0]
      if not loss[r, idx[1:]].any():
        continue
      ex = {"input_ids": ids[r, idx], "loss_mask": loss[r, idx].copy(),
            "positions": (pos[:, r, idx] if pos3 else pos[r, idx]) if pos is not None
            else np.arange(len(idx))}
      ex["loss_mask"][0] = 0
      if qwen:
        ex.update(_own_patches(b, r, idx, image_seq_len))
      elif anyres:
        ex.update(_own_crops(b, r, idx, image_seq_len))
      elif with_images:
        slots = np.unique(slot[r, idx][is_img[r, idx]])
        if int(is_img[r, idx].sum()) != len(slots) * image_seq_len or np.any(
            slots >= px.shape[0]):
          raise ImportanceError(f"row {r}, sample {s}: its image tokens do not form whole runs "
                                f"of {image_seq_len} matching the {px.shape[0]} image slots")
        ex["images"] = px[slots]
      out.append(ex)
  return out


def _own_crops(b: dict, r: int, idx: np.ndarray, crop_features: int) -> dict:
  """A sample's crops and its pack tables re-based to them (anyres)."""
  index, weight = b["pack_index"][r, idx], b["pack_weight"][r, idx]
  used = index[weight != 0] // crop_features
  out = {"pack_weight": weight, "pack_newline": b["pack_newline"][r, idx]}
  if not used.size:
    out.update(images=b["pixel_values"][:0], pack_index=np.zeros_like(index))
    return out
  c0, c1 = int(used.min()), int(used.max()) + 1
  out.update(images=b["pixel_values"][c0:c1],
             pack_index=np.where(weight != 0, index - c0 * crop_features, 0).astype(np.int32))
  return out


def _own_patches(b: dict, r: int, idx: np.ndarray, merge_unit: int) -> dict:
  """A Qwen sample's patch rows, their vision ids (segments renumbered from 1) and its pack
  table re-based to them."""
  index, weight = b["pack_index"][r, idx], b["pack_weight"][r, idx]
  used = index[weight != 0]
  out = {"pack_weight": weight, "pack_newline": b["pack_newline"][r, idx]}
  if not used.size:
    out.update(images=b["pixel_values"][:0], pack_index=np.zeros_like(index),
               **{k: b[k][:0] for k in VISION_IDS if k in b})
    return out
  m0, m1 = int(used.min()), int(used.max()) + 1
  rows = slice(m0 * merge_unit, m1 * merge_unit)
  seg = b["vision_segment_ids"][rows]
  if len(used) != m1 - m0 or (seg <= 0).any():
    raise ImportanceError(f"row {r}: a sample's image tokens do not take one block of real "
                          "patch rows of the batch")
  out.update(images=b["pixel_values"][rows],
             pack_index=np.where(weight != 0, index - m0, 0).astype(np.int32),
             **{k: b[k][rows] for k in VISION_IDS if k in b})
  out["vision_segment_ids"] = (seg - seg.min() + 1).astype(np.int32)
  return out


def stack_sizes(examples: list[dict], image_seq_len: int = 0, images: int = 0) -> dict:
  """The sizes `stack_examples` pads to: `images` (K, at least the given count), `length` (T,
  with K images a row) and `taps` (anyres pack tables)."""
  k = max([len(e["images"]) for e in examples if "images" in e] + [images])
  anyres = any("pack_index" in e for e in examples)
  need = [len(e["input_ids"]) + (0 if anyres else (k - len(e.get("images", ()))) * image_seq_len)
          for e in examples]
  taps = max((e["pack_index"].shape[-1] for e in examples if "pack_index" in e), default=0)
  return {"images": k, "length": max(need, default=0), "taps": taps}


def stack_examples(examples: list[dict], image_token_id: int | None = None,
                   image_seq_len: int = 0, at_least: dict | None = None
                   ) -> dict[str, np.ndarray]:
  """Pad per-sample dicts to one (N, T) batch; with images, pixel_values (N, K, H, W, C), K the
  most images of a sample, fewer images filled by dummy runs in the row's padding. Qwen
  examples: pixel_values (N, K, C*T*p*p) with K the most patch rows of a sample (zero rows with
  vision segment id 0 after a sample's own), vision ids (N, K, ...), positions (N, 3, T).
  `at_least`: minimum `stack_sizes` (the same stacked shapes on every process)."""
  if not examples:
    raise ImportanceError("no sample with answer tokens to compute the importance from")
  at_least = at_least or {}
  sizes = stack_sizes(examples, image_seq_len, at_least.get("images", 0))
  k = sizes["images"]
  anyres = any("pack_index" in e for e in examples)
  qwen = any("vision_segment_ids" in e for e in examples)
  n, t = len(examples), max(sizes["length"], at_least.get("length", 0))
  out = {f: np.zeros((n, t), np.int32) for f in TOKEN_FIELDS}
  if qwen:
    out["positions"] = np.zeros((n, 3, t), np.int32)
    for key in VISION_IDS:
      shaped = [e[key] for e in examples if key in e]
      if shaped:
        out[key] = np.zeros((n, k) + shaped[0].shape[1:], np.int32)
  if k:
    hwc = _image_shape(examples) or at_least.get("image_shape")
    out["pixel_values"] = np.zeros((n, k) + tuple(hwc), np.float32)
  if anyres:  # padding crops are zeros; no dummy runs: only table rows are image tokens
    taps = max(sizes["taps"], at_least.get("taps", 0))
    out["pack_index"] = np.zeros((n, t, taps), np.int32)
    out["pack_weight"] = np.zeros((n, t, taps), np.float32)
    out["pack_newline"] = np.zeros((n, t), bool)
  for i, e in enumerate(examples):
    m = len(e["input_ids"])
    out["input_ids"][i, :m] = e["input_ids"]
    out["positions"][i, ..., :m] = e["positions"]
    out["loss_mask"][i, :m] = e["loss_mask"]
    out["attention_mask"][i, :m] = 1
    out["segment_ids"][i, :m] = 1
    if k:
      n_img = len(e.get("images", ()))
      if n_img:
        out["pixel_values"][i, :n_img] = e["images"]
        for key in VISION_IDS:
          if key in e:
            out[key][i, :n_img] = e[key]
      if anyres:
        if "pack_index" in e:
          kk = e["pack_index"].shape[-1]
          out["pack_index"][i, :m, :kk] = e["pack_index"]
          out["pack_weight"][i, :m, :kk] = e["pack_weight"]
          out["pack_newline"][i, :m] = e["pack_newline"]
        continue
      out["input_ids"][i, m:m + (k - n_img) * image_seq_len] = image_token_id
  return out


def examples_batch(examples: dict, crop_features: int = 0) -> dict:
  """Stacked examples (`stack_examples`, each row's own images `pixel_values` (N, K, H, W, C))
  -> the model's inputs: the images in the batch's shared slots (N * K, H, W, C), row by row,
  and anyres `pack_index` re-based from each row's own crops to those slots (`crop_features`:
  features per crop, `image_spec`). Qwen examples (pixel_values (N, K, C*T*p*p);
  `crop_features` = m^2): one patch buffer (N * K, ...), segment ids kept apart per row,
  `pack_index` re-based, positions (3, N, T). Traceable; a batch without a per-row image axis is
  returned as it is."""
  if "vision_segment_ids" in examples and examples["vision_segment_ids"].ndim == 2:
    return _qwen_examples_batch(examples, crop_features)
  px = examples.get("pixel_values")
  if px is None or px.ndim != 5:
    return examples
  n, k = px.shape[:2]
  out = dict(examples, pixel_values=px.reshape((n * k,) + tuple(px.shape[2:])))
  if "pack_index" in examples:
    shift = (jnp.arange(n, dtype=jnp.int32) * (k * crop_features))[:, None, None]
    out["pack_index"] = jnp.where(examples["pack_weight"] != 0, examples["pack_index"] + shift,
                                  0)
  return out


def _qwen_examples_batch(examples: dict, merge_unit: int) -> dict:
  n, k = examples["vision_segment_ids"].shape
  seg = examples["vision_segment_ids"]
  rows = jnp.arange(n, dtype=jnp.int32)[:, None]
  out = dict(examples, vision_segment_ids=jnp.where(seg > 0, seg + rows * k, 0).reshape(-1),
             positions=jnp.moveaxis(examples["positions"], 1, 0))
  for key in ("pixel_values", "vision_pos_hw", "vision_window_ids"):
    if key in examples:
      x = examples[key]
      out[key] = x.reshape((n * k,) + tuple(x.shape[2:]))
  shift = (jnp.arange(n, dtype=jnp.int32) * (k // merge_unit))[:, None, None]
  out["pack_index"] = jnp.where(examples["pack_weight"] != 0, examples["pack_index"] + shift, 0)
  return out


def collect_examples(batches: Iterable[dict], num_examples: int, image_token_id=None,
                     image_seq_len: int = 0) -> dict[str, np.ndarray]:
  """The first `num_examples` samples (with answer tokens) of `batches` (an iterable, or a
  function returning one), stacked. With several processes, `batches` are this process's and it
  takes ceil(num_examples / processes) of their samples; the stacks get the same shapes on
  every process (sizes agreed over processes)."""
  procs = jax.process_count()
  if procs == 1:
    return stack_examples(_take(batches, num_examples, image_token_id, image_seq_len),
                          image_token_id, image_seq_len)
  # every process must reach every collective below: a process's own failure is shared first
  # and raised on all of them (else the others would wait in the all-gather)
  def take():
    found = _take(batches, -(-num_examples // procs), image_token_id, image_seq_len)
    if not found:
      raise ImportanceError("no sample with answer tokens in this process's data")
    return found

  local = {}
  found, err = shared_call(take, local)
  if not err:
    local.update(stack_sizes(found, image_seq_len), image_shape=_image_shape(found))
  every = raise_shared(local, err)
  k = max(s["images"] for s in every)
  length = _max_over_processes([stack_sizes(found, image_seq_len, k)["length"]])[0]
  out, err = shared_call(lambda: stack_examples(found, image_token_id, image_seq_len, {
      "images": k, "length": length, "taps": max(s["taps"] for s in every),
      "image_shape": next((s["image_shape"] for s in every if s["image_shape"]), None)}), {})
  shapes = {} if err else {key: list(np.shape(v)[1:]) for key, v in sorted(out.items())}
  every = raise_shared({"shapes": shapes}, err)
  if len({str(s["shapes"]) for s in every}) > 1:
    raise ImportanceError(f"the processes' importance examples differ in fields or shapes "
                          f"(this process: {shapes}); e.g. some hold no image samples: raise "
                          "penalty.fisher_samples or use one process")
  return out


def shared_call(fn, local: dict):
  """(fn(), None), or (None, the exception) with its message in `local["error"]`."""
  try:
    out = fn()
    local["error"] = None
    return out, None
  except Exception as e:  # noqa: BLE001 (raised on every process by raise_shared)
    local["error"] = f"{type(e).__name__}: {e}"
    return None, e


def raise_shared(local: dict, err: BaseException | None,
                 what: str = "importance examples") -> list:
  """Every process's `local` (an all-gather); raises when any process failed: its own
  exception on the process that failed, an ImportanceError naming it (and `what`) on the
  others. Every process must call it (a collective)."""
  local.setdefault("error", None if err is None else f"{type(err).__name__}: {err}")
  every = _all_processes(local)
  bad = [f"process {i}: {s['error']}" for i, s in enumerate(every) if s["error"]]
  if err is not None:
    raise err
  if bad:
    raise ImportanceError(f"{what}: " + "; ".join(bad))
  return every


def _take(batches: Iterable[dict], num: int, image_token_id, image_seq_len: int) -> list[dict]:
  """The first `num` samples (with answer tokens) of `batches`."""
  if callable(batches) and not hasattr(batches, "__iter__"):
    batches = batches()
  found: list[dict] = []
  for batch in batches:
    found += split_examples(batch, image_token_id, image_seq_len)
    if len(found) >= num:
      break
  return found[:num]


def _image_shape(examples: list[dict]) -> list[int] | None:
  """The per-image shape of the examples' images (an empty image array has it too)."""
  return next((list(e["images"].shape[1:]) for e in examples if "images" in e), None)


def per_process(values: list[int]) -> np.ndarray:
  """(processes, len(values)) int64: every process's `values` (an all-gather), in process
  order."""
  from jax.experimental import multihost_utils
  got = np.asarray(multihost_utils.process_allgather(np.asarray(values, np.int64)))
  return got.reshape(-1, len(values))


def _max_over_processes(values: list[int]) -> list[int]:
  return [int(v) for v in per_process(values).max(axis=0)]


def _all_processes(obj) -> list:
  """`obj` (JSON-able) of every process, in process order."""
  import json
  from jax.experimental import multihost_utils
  data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
  size = _max_over_processes([len(data)])[0]
  buf = np.zeros(size, np.uint8)
  buf[:len(data)] = data
  got = np.asarray(multihost_utils.process_allgather(buf)).reshape(-1, size)
  return [json.loads(bytes(row).rstrip(b"\0").decode()) for row in got]
