"""Parameter importance for the forgetting penalties: diagonal Fisher (docs/methods.md §5.1, 5.2),
MAS (5.5), from one per-example engine.

  empirical  F_i = (1/N) sum_n (d_i log p(y_n|x_n))^2,  log p(y|x) = sum_{t in answer} log p(y_t|..)
  true       the same with y^_t ~ p_theta(.|x, y_<t) sampled at every answer position while the
             ground-truth prefix is teacher-forced [choice, token-level]
  mas        O_i = (1/N) sum_n |d_i mean_{t in answer} ||z_t||^2|, z_t the logits [choice]
  (magnitude scores are in magnitude.py; importance files in store.py)

Per-example gradients (never a squared batch mean): `jax.vmap` over a chunk of examples, `lax.scan`
over chunks, in one jit; memory is `chunk` gradient copies of the differentiated leaves, which are
only the leaves a mask selects (partition before `grad`). Inputs may be sharded: examples are put
on the mesh's batch axes (data, fsdp, expert), the leaves keep their own shardings.

An example is one sample. `split_examples` cuts a training batch (packed rows, image slots shared
across the batch in row-major order) into one row per sample holding its own images; rows are
padded to a common length and image count with dummy image runs in the padding (attention 0, loss
0), the convention of data/packing.py, so each sample's gradient is exactly its own. Anyres
batches keep each sample's crops and pack-table rows; Qwen2-VL / 2.5-VL batches each sample's
patch rows with their vision ids (image segments numbered from 1), its pack-table rows re-based
to them and its (3, L) M-RoPE positions (`data/qwen_batch.py`).

Files (`store.py`): `save_importance` / `load_importance`.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from mllm_tune import pytree
from mllm_tune.models.mesh_axes import BATCH_AXES
from mllm_tune.models.qwen_vl_config import QwenVLConfig

KINDS = ("empirical", "true", "mas")
VISION_IDS = ("vision_segment_ids", "vision_pos_hw", "vision_window_ids")  # Qwen, per patch
META_FILE = "importance.json"
FORMAT = "mllm_tune.importance/1"
TOKEN_FIELDS = ("input_ids", "attention_mask", "positions", "segment_ids", "loss_mask")
# (variables, example) -> (logits (T, V), targets (T,), weights (T,)) for one example
LogitsFn = Callable[[dict, dict], tuple[jax.Array, jax.Array, jax.Array]]


class ImportanceError(ValueError):
  """Bad importance request, or an importance file that does not fit this model."""


# ----------------------------------------------------------------------------- the engine
def example_objective(logits_fn: LogitsFn, kind: str):
  """`(variables, example, key) -> scalar` whose per-example gradient, squared (fisher kinds)
  or absolute (mas), is the importance sample. `example["_valid"]` (0/1) zeroes padding."""
  if kind not in KINDS:
    raise ImportanceError(f"importance kind must be one of {KINDS}, got {kind!r}")

  def fn(variables, example, key):
    example = dict(example)
    valid = example.pop("_valid", 1.0)
    logits_TV, targets_T, w_T = logits_fn(variables, example)
    logits_TV, w_T = logits_TV.astype(jnp.float32), w_T.astype(jnp.float32)
    if kind == "mas":
      sq_T = jnp.sum(jnp.square(logits_TV), axis=-1)
      return valid * jnp.sum(w_T * sq_T) / jnp.maximum(jnp.sum(w_T), 1.0)
    if kind == "true":
      targets_T = jax.random.categorical(key, jax.lax.stop_gradient(logits_TV), axis=-1)
    logp_TV = jax.nn.log_softmax(logits_TV, axis=-1)
    picked_T = jnp.take_along_axis(logp_TV, targets_T[:, None].astype(jnp.int32), axis=-1)[:, 0]
    return valid * jnp.sum(w_T * picked_T)
  return fn


def per_example_sums(objective, reduce: str = "square"):
  """Jitted `(train, frozen, acc, examples (S, C, ...), keys (S, C)) -> acc + sum over the S*C
  examples of reduce(d objective / d train)`: vmap over a chunk of C, scan over S chunks."""
  red = {"square": jnp.square, "abs": jnp.abs}[reduce]

  def run(train, frozen, acc, examples, keys):
    def one(example, key):
      return jax.grad(lambda t: objective(pytree.combine(t, frozen), example, key))(train)

    def body(acc, xs):
      g = jax.vmap(one)(*xs)
      return jax.tree.map(lambda a, x: a + jnp.sum(red(x.astype(jnp.float32)), axis=0),
                          acc, g), None

    return jax.lax.scan(body, acc, (examples, keys))[0]
  return jax.jit(run, donate_argnums=(2,))


def _num_examples(examples: dict) -> int:
  sizes = {int(np.shape(x)[0]) for x in examples.values()}
  if len(sizes) != 1:
    raise ImportanceError(f"every example array needs the same leading axis; got {sorted(sizes)}")
  return sizes.pop()


def _example_sharding(mesh, chunk: int, ndim: int):
  if mesh is None:
    return None
  axes = tuple(a for a in BATCH_AXES if mesh.shape.get(a, 1) > 1)
  size = math.prod(mesh.shape[a] for a in axes)
  spec = P(None, axes) if axes and chunk % size == 0 else P()
  return NamedSharding(mesh, P(*tuple(spec), *([None] * (ndim - len(tuple(spec))))))


def importance(logits_fn: LogitsFn, variables: dict, leaves: dict, examples: dict,
               kind: str = "empirical", chunk: int = 8, rng: jax.Array | None = None,
               mesh=None, chunks_per_call: int = 8) -> dict[str, jax.Array]:
  """{variables path: float32 importance shaped like the leaf} over the leaves the mask tree
  `leaves` selects. `examples`: arrays with a leading example axis N (see `stack_examples`).
  N is padded to whole chunks with zero-weight copies; one compile for all calls."""
  n = _num_examples(examples)
  if n == 0:
    raise ImportanceError("no examples to compute the importance from")
  train, frozen = pytree.partition(variables, leaves)
  if not pytree.flatten(train):
    raise ImportanceError("the leaf mask selects no leaf to compute the importance of")
  engine = per_example_sums(example_objective(logits_fn, kind),
                            "abs" if kind == "mas" else "square")
  n_chunks = -(-n // chunk)
  calls = -(-n_chunks // chunks_per_call)
  per_call = -(-n_chunks // calls)  # balanced: under one padded chunk per call
  total = calls * per_call * chunk
  pad = np.zeros(total, np.int64)
  pad[:n] = np.arange(n)
  valid = (np.arange(total) < n).astype(np.float32)
  keys = jax.random.split(jax.random.key(0) if rng is None else rng, total)
  acc = jax.tree.map(lambda x: jnp.zeros_like(x, jnp.float32), train)
  for c in range(calls):
    idx = pad[c * per_call * chunk:(c + 1) * per_call * chunk]
    ex = {k: np.asarray(v)[idx] for k, v in examples.items()}
    ex["_valid"] = valid[c * per_call * chunk:(c + 1) * per_call * chunk]
    ex = {k: v.reshape((per_call, chunk) + v.shape[1:]) for k, v in ex.items()}
    if mesh is not None:
      ex = {k: jax.device_put(v, _example_sharding(mesh, chunk, v.ndim)) for k, v in ex.items()}
    k = keys[c * per_call * chunk:(c + 1) * per_call * chunk].reshape((per_call, chunk))
    if mesh is not None:
      k = jax.device_put(k, _example_sharding(mesh, chunk, 2))
    acc = engine(train, frozen, acc, ex, k)
  return {p: x / n for p, x in pytree.flatten(acc).items()}


# ----------------------------------------------------------------------------- LM examples
def lm_logits_fn(model) -> LogitsFn:
  """One LM example (input_ids, loss_mask, attention_mask, positions, segment_ids (T,);
  optional pixel_values (K, H, W, C)) -> (logits (T-1, V), targets = input_ids[1:],
  weights = loss_mask[1:]): token t is a target predicted from t-1 (step.token_ce)."""
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


def stack_examples(examples: list[dict], image_token_id: int | None = None,
                   image_seq_len: int = 0) -> dict[str, np.ndarray]:
  """Pad per-sample dicts to one (N, T) batch; with images, pixel_values (N, K, H, W, C), K the
  most images of a sample, fewer images filled by dummy runs in the row's padding. Qwen
  examples: pixel_values (N, K, C*T*p*p) with K the most patch rows of a sample (zero rows with
  vision segment id 0 after a sample's own), vision ids (N, K, ...), positions (N, 3, T)."""
  if not examples:
    raise ImportanceError("no sample with answer tokens to compute the importance from")
  k = max((len(e["images"]) for e in examples if "images" in e), default=0)
  anyres = any("pack_index" in e for e in examples)
  qwen = any("vision_segment_ids" in e for e in examples)
  need = [len(e["input_ids"]) + (0 if anyres else (k - len(e.get("images", ()))) * image_seq_len)
          for e in examples]
  n, t = len(examples), max(need)
  out = {f: np.zeros((n, t), np.int32) for f in TOKEN_FIELDS}
  if qwen:
    out["positions"] = np.zeros((n, 3, t), np.int32)
    for key in VISION_IDS:
      shaped = [e[key] for e in examples if key in e]
      if shaped:
        out[key] = np.zeros((n, k) + shaped[0].shape[1:], np.int32)
  if k:
    hwc = next(e["images"].shape[1:] for e in examples if "images" in e and len(e["images"]))
    out["pixel_values"] = np.zeros((n, k) + hwc, np.float32)
  if anyres:  # padding crops are zeros; no dummy runs: only table rows are image tokens
    taps = max(e["pack_index"].shape[-1] for e in examples if "pack_index" in e)
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
  """The first `num_examples` samples (with answer tokens) of `batches`, stacked."""
  found: list[dict] = []
  for batch in batches:
    found += split_examples(batch, image_token_id, image_seq_len)
    if len(found) >= num_examples:
      break
  return stack_examples(found[:num_examples], image_token_id, image_seq_len)


def fisher_from_batches(model, variables: dict, leaves: dict, batches: Iterable[dict],
                        kind: str = "empirical", num_examples: int = 512, chunk: int = 8,
                        rng: jax.Array | None = None, mesh=None) -> tuple[dict, int]:
  """Importance of `kind` (empirical | true | mas) of a model over the first `num_examples`
  samples of `batches` -> ({variables path: importance}, number of samples used)."""
  tok, seq = image_spec(model)
  examples = collect_examples(batches, num_examples, tok, seq)
  n = _num_examples(examples)
  return importance(lm_logits_fn(model), variables, leaves, examples, kind, chunk, rng, mesh), n


def online_update(previous: dict, current: dict, gamma: float) -> dict:
  """Online EWC (docs/methods.md §5.2): F~_k = gamma F~_{k-1} + F_k, leaf by leaf (same leaves)."""
  if not 0.0 < gamma <= 1.0:
    raise ImportanceError(f"online EWC gamma must be in (0, 1], got {gamma}")
  if set(previous) != set(current):
    raise ImportanceError(f"online EWC: the previous importance covers leaves "
                          f"{sorted(set(previous) ^ set(current))[:4]} the current one does not "
                          "(or vice versa)")
  return {p: gamma * previous[p] + current[p] for p in current}
