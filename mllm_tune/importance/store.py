"""Importance files: `save_importance` / `load_importance` write orbax tensors plus
`importance.json` (model config hash, leaf paths and shapes, base content fingerprint); loading for
another model, another base, or a file holding NaN raises `ImportanceError` naming the file and the
leaf."""
from __future__ import annotations

import hashlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from mllm_tune import pytree
from mllm_tune.importance.fisher import FORMAT, META_FILE, ImportanceError


def model_config_hash(config) -> str:
  """Hash of the architecture (runtime fields such as dtypes, remat policy and attention
  implementation left out, and `LATER_FIELDS` at their old value): a Fisher fits a model iff
  the hashes agree."""
  from mllm_tune.models.config import LATER_FIELDS, NON_ARCH_FIELDS, config_to_dict

  def later_default(k, v) -> bool:
    return k in LATER_FIELDS and (list(v) == list(LATER_FIELDS[k])
                                  if isinstance(v, (list, tuple)) else v == LATER_FIELDS[k])

  def strip(d):
    if isinstance(d, dict):
      return {k: strip(v) for k, v in d.items()
              if k not in NON_ARCH_FIELDS and not later_default(k, v)}
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
  ckptr.save(os.path.join(path, "tensors"), pytree.unflatten(dict(scores)), force=True)
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
  (skipped when None) (`read_meta`), and that no entry is NaN/Inf or negative."""
  import orbax.checkpoint as ocp
  path = os.path.abspath(path)
  meta = read_meta(path, expect_shapes=expect_shapes, model_config=model_config,
                   base_fingerprint=base_fingerprint)
  default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = {p: jax.ShapeDtypeStruct(tuple(i["shape"]), jnp.dtype(i["dtype"]),
                                      sharding=(shardings or {}).get(p, default))
              for p, i in meta["leaves"].items()}
  tree = ocp.StandardCheckpointer().restore(os.path.join(path, "tensors"),
                                            pytree.unflatten(abstract))
  scores = pytree.flatten(tree)
  check_importance(scores, os.path.join(path, META_FILE))
  return scores, meta


def read_meta(path: str, *, expect_shapes: dict | None = None, model_config=None,
              base_fingerprint: str | None = None) -> dict:
  """The importance file's metadata, checked (`load_importance`'s checks before any tensor is
  read; no collective, so a multi-process caller can share a failure before the restore)."""
  path = os.path.abspath(path)
  meta_path = os.path.join(path, META_FILE)
  if not os.path.isfile(meta_path):
    raise ImportanceError(f"{path}: no {META_FILE}; not an importance file written by "
                          "store.save_importance")
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
  return meta


def default_path(base_path: str, kind: str) -> str:
  """`<base checkpoint dir>/importance/<kind>`: where a reusable Fisher of that base lives."""
  return os.path.join(os.path.abspath(base_path), "importance", kind)

