"""Parameter importance for the forgetting penalties: diagonal Fisher (METHODS.md 5.1, 5.2), MAS
(5.5), and the magnitude scores SPIDER / LoRASculpt use, all from one per-example engine.

  empirical  F_i = (1/N) sum_n (d_i log p(y_n|x_n))^2,  log p(y|x) = sum_{t in answer} log p(y_t|..)
  true       the same with y^_t ~ p_theta(.|x, y_<t) sampled at every answer position while the
             ground-truth prefix is teacher-forced [choice, token-level]
  mas        O_i = (1/N) sum_n |d_i mean_{t in answer} ||z_t||^2|, z_t the logits [choice]
  magnitude  `weight_magnitude` (SPIDER psi(|X|)), `cmr_weight` (LoRASculpt), `gradient_magnitude`
             (sum of |batch gradients|, importance.py's grad_abs)

Per-example gradients (never a squared batch mean): `jax.vmap` over a chunk of examples, `lax.scan`
over chunks, in one jit; memory is `chunk` gradient copies of the differentiated leaves, which are
only the leaves a mask selects (partition before `grad`). Inputs may be sharded: examples are put
on the mesh's (data, fsdp) axes, the leaves keep their own shardings.

An example is one sample. `split_examples` cuts a training batch (packed rows, image slots shared
across the batch in row-major order) into one row per sample holding its own images; rows are
padded to a common length and image count with dummy image runs in the padding (attention 0, loss
0), the convention of data/packing.py, so each sample's gradient is exactly its own.

Files: `save_importance` / `load_importance` write orbax tensors plus `importance.json` (model
config hash, leaf paths and shapes, base content fingerprint); loading for another model, another
base, or a file holding NaN raises `ImportanceError` naming the file and the leaf.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from mllm_tune.tuning import select
from mllm_tune.tuning.api import combine, partition

KINDS = ("empirical", "true", "mas")
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
      return jax.grad(lambda t: objective(combine(t, frozen), example, key))(train)

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
  axes = tuple(a for a in ("data", "fsdp") if mesh.shape.get(a, 1) > 1)
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
  train, frozen = partition(variables, leaves)
  if not select.flatten(train):
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
  return {p: x / n for p, x in select.flatten(acc).items()}


# ----------------------------------------------------------------------------- LM examples
def lm_logits_fn(model) -> LogitsFn:
  """One LM example (input_ids, loss_mask, attention_mask, positions, segment_ids (T,);
  optional pixel_values (K, H, W, C)) -> (logits (T-1, V), targets = input_ids[1:],
  weights = loss_mask[1:]): token t is a target predicted from t-1 (step.token_ce)."""
  def fn(variables, ex):
    kw = {k: ex[k][None] for k in ("attention_mask", "positions", "segment_ids") if k in ex}
    if "pixel_values" in ex:
      kw["pixel_values"] = ex["pixel_values"]
    logits = model.apply(variables, ex["input_ids"][None], **kw)[0]
    return logits[:-1], ex["input_ids"][1:], ex["loss_mask"][1:]
  return fn


def image_spec(model) -> tuple[int | None, int]:
  """(image token id, tokens per image) of a LLaVA model, (None, 0) for a text-only one."""
  cfg = getattr(model, "config", None)
  if cfg is None or not hasattr(cfg, "image_token_id"):
    return None, 0
  return int(cfg.image_token_id), int(cfg.image_seq_len)


def split_examples(batch: dict, image_token_id: int | None = None,
                   image_seq_len: int = 0) -> list[dict[str, np.ndarray]]:
  """A training batch -> one dict per sample (segment of a row) with answer tokens: its
  input_ids, positions, loss_mask (L,) and its own images (n, H, W, C) from the shared slots.
  Batches with a leading grad-accumulation axis (A, B, T) are split per micro-batch."""
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
  rows, length = ids.shape
  mask = b.get("attention_mask", np.ones_like(ids))
  seg = b.get("segment_ids", (mask > 0).astype(np.int32))
  pos = b.get("positions")
  loss = b["loss_mask"] if "loss_mask" in b else mask
  px = b.get("pixel_values")
  with_images = px is not None and image_token_id is not None and image_seq_len > 0
  if with_images:
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
            "positions": pos[r, idx] if pos is not None else np.arange(len(idx))}
      ex["loss_mask"][0] = 0
      if with_images:
        slots = np.unique(slot[r, idx][is_img[r, idx]])
        if int(is_img[r, idx].sum()) != len(slots) * image_seq_len or np.any(
            slots >= px.shape[0]):
          raise ImportanceError(f"row {r}, sample {s}: its image tokens do not form whole runs "
                                f"of {image_seq_len} matching the {px.shape[0]} image slots")
        ex["images"] = px[slots]
      out.append(ex)
  return out


def stack_examples(examples: list[dict], image_token_id: int | None = None,
                   image_seq_len: int = 0) -> dict[str, np.ndarray]:
  """Pad per-sample dicts to one (N, T) batch; with images, pixel_values (N, K, H, W, C), K the
  most images of a sample, fewer images filled by dummy runs in the row's padding."""
  if not examples:
    raise ImportanceError("no sample with answer tokens to compute the importance from")
  k = max((len(e["images"]) for e in examples if "images" in e), default=0)
  need = [len(e["input_ids"]) + (k - len(e.get("images", ()))) * image_seq_len
          for e in examples]
  n, t = len(examples), max(need)
  out = {f: np.zeros((n, t), np.int32) for f in TOKEN_FIELDS}
  if k:
    hwc = next(e["images"].shape[1:] for e in examples if "images" in e and len(e["images"]))
    out["pixel_values"] = np.zeros((n, k) + hwc, np.float32)
  for i, e in enumerate(examples):
    m = len(e["input_ids"])
    out["input_ids"][i, :m] = e["input_ids"]
    out["positions"][i, :m] = e["positions"]
    out["loss_mask"][i, :m] = e["loss_mask"]
    out["attention_mask"][i, :m] = 1
    out["segment_ids"][i, :m] = 1
    if k:
      n_img = len(e.get("images", ()))
      if n_img:
        out["pixel_values"][i, :n_img] = e["images"]
      out["input_ids"][i, m:m + (k - n_img) * image_seq_len] = image_token_id
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
  """Online EWC (METHODS 5.2): F~_k = gamma F~_{k-1} + F_k, leaf by leaf (same leaves)."""
  if not 0.0 < gamma <= 1.0:
    raise ImportanceError(f"online EWC gamma must be in (0, 1], got {gamma}")
  if set(previous) != set(current):
    raise ImportanceError(f"online EWC: the previous importance covers leaves "
                          f"{sorted(set(previous) ^ set(current))[:4]} the current one does not "
                          "(or vice versa)")
  return {p: gamma * previous[p] + current[p] for p in current}


# ----------------------------------------------------------------------------- magnitudes
def weight_magnitude(x: jax.Array, per_layer: bool = False) -> jax.Array:
  """SPIDER's psi(|X|) = sigmoid(standardized |X|) (spider.importance)."""
  from mllm_tune.tuning.spider import importance as psi
  return psi(x, per_layer)


def cmr_weight(k0: jax.Array, omega: float = 1.0) -> jax.Array:
  """LoRASculpt's tanh(omega |1 / ln(|K0| / ||K0||_F)|) (sculpt.cmr_weight)."""
  from mllm_tune.tuning.sculpt import cmr_weight as cmr
  return cmr(k0, omega)


def gradient_magnitude(loss_fn, variables: dict, batches: Iterable, leaves: dict) -> dict:
  """Sum over batches of |batch gradient| (importance.importance_scores, kind grad_abs)."""
  from mllm_tune.tuning.importance import importance_scores
  return importance_scores(loss_fn, variables, batches, leaves, kind="grad_abs")


# ----------------------------------------------------------------------------- files
def model_config_hash(config) -> str:
  """Hash of the architecture (runtime fields such as dtypes, remat policy and attention
  implementation left out): a Fisher fits a model iff the hashes agree."""
  from mllm_tune.models.config import NON_ARCH_FIELDS, config_to_dict

  def strip(d):
    if isinstance(d, dict):
      return {k: strip(v) for k, v in d.items() if k not in NON_ARCH_FIELDS}
    return d
  blob = json.dumps(strip(config_to_dict(config)), sort_keys=True, default=str)
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


def check_importance(scores: dict, where: str) -> None:
  """NaN/Inf or negative entries -> ImportanceError naming `where` and the leaf."""
  for p, x in sorted(scores.items()):
    x = jnp.asarray(x)
    bad = int(jnp.sum(~jnp.isfinite(x)))
    if bad:
      raise ImportanceError(f"{where}: leaf '{p}' holds {bad} NaN/Inf entries of {x.size}")
    neg = int(jnp.sum(x < 0))
    if neg:
      raise ImportanceError(f"{where}: leaf '{p}' holds {neg} negative entries (an importance "
                            "is a mean of squares or absolute values, never negative)")


def save_importance(path: str, scores: dict, *, kind: str, model_config=None,
                    base_fingerprint: str = "", base_path: str = "", num_examples: int = 0,
                    extra: dict | None = None) -> None:
  """Write `{variables path: array}` to `path/` (orbax `tensors/` + `importance.json`)."""
  import orbax.checkpoint as ocp
  check_importance(scores, path)
  path = os.path.abspath(path)
  os.makedirs(path, exist_ok=True)
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(os.path.join(path, "tensors"), select.unflatten(dict(scores)), force=True)
  ckptr.wait_until_finished()
  meta = {"format": FORMAT, "kind": kind, "num_examples": int(num_examples),
          "config_hash": model_config_hash(model_config) if model_config is not None else "",
          "base_fingerprint": base_fingerprint, "base_path": base_path,
          "leaves": {p: {"shape": list(np.shape(x)), "dtype": str(jnp.asarray(x).dtype)}
                     for p, x in sorted(scores.items())}, **(extra or {})}
  if jax.process_index() == 0:
    with open(os.path.join(path, META_FILE), "w") as f:
      json.dump(meta, f, indent=2, sort_keys=True)


def load_importance(path: str, *, expect_shapes: dict | None = None, model_config=None,
                    base_fingerprint: str | None = None,
                    shardings: dict | None = None) -> tuple[dict, dict]:
  """-> ({variables path: array}, metadata). Checks, each naming the file (and the leaf): the
  model config hash, every leaf exists in `expect_shapes` with that shape, the base fingerprint
  (skipped when None), and that no entry is NaN/Inf or negative."""
  import orbax.checkpoint as ocp
  path = os.path.abspath(path)
  meta_path = os.path.join(path, META_FILE)
  if not os.path.isfile(meta_path):
    raise ImportanceError(f"{path}: no {META_FILE}; not an importance file written by "
                          "fisher.save_importance")
  with open(meta_path) as f:
    meta = json.load(f)
  if meta.get("format") != FORMAT:
    raise ImportanceError(f"{meta_path}: format {meta.get('format')!r}, expected {FORMAT!r}")
  if model_config is not None and meta.get("config_hash"):
    want = model_config_hash(model_config)
    if meta["config_hash"] != want:
      raise ImportanceError(f"{meta_path}: computed for a model with config hash "
                            f"{meta['config_hash']}, but this model's is {want} (another "
                            "architecture): recompute the importance for this model")
  for p, info in sorted(meta["leaves"].items()):
    if expect_shapes is None:
      break
    if p not in expect_shapes:
      raise ImportanceError(f"{meta_path}: leaf '{p}' is not a parameter of this model")
    if tuple(info["shape"]) != tuple(expect_shapes[p]):
      raise ImportanceError(f"{meta_path}: leaf '{p}' has shape {tuple(info['shape'])} in the "
                            f"file but {tuple(expect_shapes[p])} in this model")
  if base_fingerprint and meta.get("base_fingerprint") not in ("", None, base_fingerprint):
    raise ImportanceError(f"{meta_path}: computed on base '{meta.get('base_path')}' "
                          f"(fingerprint {meta['base_fingerprint']}), but the base loaded now "
                          f"has fingerprint {base_fingerprint}: recompute it for this base")
  default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = {p: jax.ShapeDtypeStruct(tuple(i["shape"]), jnp.dtype(i["dtype"]),
                                      sharding=(shardings or {}).get(p, default))
              for p, i in meta["leaves"].items()}
  tree = ocp.StandardCheckpointer().restore(os.path.join(path, "tensors"),
                                            select.unflatten(abstract))
  scores = select.flatten(tree)
  check_importance(scores, meta_path)
  return scores, meta


def default_path(base_path: str, kind: str) -> str:
  """`<base checkpoint dir>/importance/<kind>`: where a reusable Fisher of that base lives."""
  return os.path.join(os.path.abspath(base_path), "importance", kind)

