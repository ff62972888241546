"""Device meshes and parameter shardings from ordered `(regex, PartitionSpec)` rules.

Rules are matched with `re.fullmatch` on `/`-joined *storage* paths (scanned layers keep their
leading layer axis, e.g. `llm/layers/attn/q_proj/kernel` is (L, D, N*H)); the first match wins.
A mesh axis that does not divide its dimension is dropped for that dimension (replicated), so the
same rules work for tiny test models and 7B models.
"""
from __future__ import annotations

import contextlib
import logging
import math
import re
from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mllm_tune import pytree
from mllm_tune.models.adapters import (BOTTLENECK_UP_BIAS, DORA_M, EXTRA_BIAS, IA3_IN, IA3_OUT,
                                       LORA_BIAS, VERA_BVEC)
from mllm_tune.models.mesh_axes import BATCH_AXES, MESH_AXES  # noqa: F401 (re-exported)
from mllm_tune.models.moe import expert_parallel

log = logging.getLogger(__name__)

# FSDP over the large input/output dims, Megatron-style tensor parallelism on attention/MLP.
DEFAULT_RULES: list[tuple[str, P]] = [
    (r"llm/layers/attn/(q|k|v)_proj/kernel", P(None, "fsdp", "tensor")),
    (r"llm/layers/attn/(q|k|v)_proj/bias", P(None, "tensor")),
    (r"llm/layers/attn/o_proj/kernel", P(None, "tensor", "fsdp")),
    (r"llm/layers/mlp/(gate|up)_proj/kernel", P(None, "fsdp", "tensor")),
    (r"llm/layers/mlp/down_proj/kernel", P(None, "tensor", "fsdp")),
    # mixture of experts (L, E, D, 2F) / (L, E, F, D): experts over the expert axis (expert
    # parallelism, `models/moe.routed_experts_sharded`), FSDP over the model width (the fused
    # gate/up columns stay whole)
    (r"llm/layers/mlp/experts_gate_up", P(None, "expert", "fsdp", None)),
    (r"llm/layers/mlp/experts_down", P(None, "expert", None, "fsdp")),
    (r"llm/embed/embedding", P("tensor", "fsdp")),
    (r"llm/lm_head/kernel", P("fsdp", "tensor")),
    (r"vision/layers/(attn|mlp)/\w+/kernel", P(None, "fsdp", None)),
    (r"projector/linear_\d/kernel", P("fsdp", None)),
    (r".*", P()),
]


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None, *, expert: int = 1) -> Mesh:
  """A (data, fsdp, expert, tensor) mesh; one axis may be -1 (all remaining devices)."""
  devices = list(devices if devices is not None else jax.devices())
  sizes = [data, fsdp, expert, tensor]
  if sizes.count(-1) > 1:
    raise ValueError("at most one mesh axis may be -1")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"{len(devices)} devices are not divisible by the fixed axes "
                       f"{dict(zip(MESH_AXES, sizes))}")
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                     f"have {len(devices)}")
  return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def mesh_context(mesh: Mesh):
  """`moe.expert_parallel(mesh)` when the mesh splits experts (what the MoE layers read, at
  trace time, to run expert parallel), else a no-op context: everything else takes its
  shardings from its arrays."""
  if mesh.shape.get("expert", 1) > 1:
    return expert_parallel(mesh)
  return contextlib.nullcontext()


def batch_shards(mesh: Mesh) -> int:
  """How many ways a batch's rows are split: the product of the mesh's batch axes."""
  return math.prod(mesh.shape.get(a, 1) for a in BATCH_AXES)


def spec_for(path: str, shape: tuple[int, ...], mesh: Mesh,
             rules: Sequence[tuple[str, P]] = DEFAULT_RULES) -> P:
  """The first rule matching `path`, fitted to `shape` (non-dividing axes dropped)."""
  for pattern, spec in rules:
    if re.fullmatch(pattern, path):
      break
  else:
    raise ValueError(f"no sharding rule matches '{path}'; add a catch-all ('.*', P())")
  if len(tuple(spec)) > len(shape):
    raise ValueError(f"sharding rule '{pattern}' has {len(tuple(spec))} dims but '{path}' is "
                     f"{shape}")
  return fit_spec(spec, shape, mesh)


def fit_spec(spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
  """Pad `spec` to `shape`'s rank and drop mesh axes that do not divide their dimension."""
  spec = tuple(spec) + (None,) * (len(shape) - len(tuple(spec)))
  fitted = []
  for dim, axes in zip(shape, spec):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    size = math.prod(mesh.shape[a] for a in names)
    fitted.append(axes if names and dim % size == 0 else None)
  return P(*fitted)


def sharding_fn(mesh: Mesh, rules: Sequence[tuple[str, P]] = DEFAULT_RULES):
  """`(path, shape) -> NamedSharding`, the form `load_pretrained(sharding_fn=...)` takes."""
  def fn(path: str, shape: tuple[int, ...]) -> NamedSharding:
    return NamedSharding(mesh, spec_for(path, shape, mesh, rules))
  return fn


def tree_shardings(shapes_tree, mesh: Mesh, rules: Sequence[tuple[str, P]] = DEFAULT_RULES):
  """Shardings for every leaf of a (shape) pytree of nested dicts."""
  flat = jax.tree_util.tree_flatten_with_path(shapes_tree)[0]
  fn = sharding_fn(mesh, rules)
  out = [fn("/".join(str(k.key) for k in path), tuple(x.shape)) for path, x in flat]
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(shapes_tree), out)


# adapter vectors along a base layer's output (or input) features
OUT_VECTORS = (DORA_M, LORA_BIAS, IA3_OUT, EXTRA_BIAS, VERA_BVEC, BOTTLENECK_UP_BIAS)
IN_VECTORS = (IA3_IN,)


def state_shardings(tree: dict, mesh: Mesh, rules: Sequence[tuple[str, P]] = DEFAULT_RULES,
                    base: dict | None = None) -> dict:
  """Shardings for a variables-shaped tree: params by rule; adapters inherit their base
  layer's spec (a Linear's kernel, an expert stack, the token embedding (V, D) read as a
  (d_in, d_out) kernel): factors named `*_a` / `*_a0` (LoRA A, PiSSA's A0) take the input-dim
  axis, `*_b` / `*_b0` the output-dim axis, per-feature vectors (DoRA's magnitude, lora_bias,
  (IA)^3, ...) the axis of their features; per-expert LoRA the same on its stack's; everything
  else replicated. `base`: the whole variables tree (or its shapes) when `tree` is one
  partition of it, e.g. the trainable leaves alone, whose adapters' base layers are frozen."""
  flat = pytree.flatten(tree)
  kernels = {}  # module path -> (spec, shape) of its kernel / stack / embedding
  out = {}
  for path, x in pytree.flatten(tree if base is None else base).items():
    if path.startswith("params/"):
      spec = spec_for(path[len("params/"):], tuple(x.shape), mesh, rules)
      kernels[path[len("params/"):]] = (spec, tuple(x.shape))
      if path in flat:
        out[path] = NamedSharding(mesh, spec)
  for path, x in flat.items():
    if path.startswith("params/"):
      if path not in out:
        out[path] = NamedSharding(mesh, spec_for(path[len("params/"):],
                                                           tuple(x.shape), mesh, rules))
      continue
    sub = path.split("/", 1)[1] if "/" in path else path
    module, leaf = sub.rsplit("/", 1) if "/" in sub else ("", sub)
    kspec, kshape = next((kernels[k] for k in (module + "/kernel", module + "/embedding",
                                               module) if k in kernels), (P(), ()))
    kspec = tuple(kspec) + (None,) * (len(kshape) - len(tuple(kspec)))
    nd = len(x.shape)
    stacked = pytree.is_stacked(sub)
    lead = kspec[:-2] if len(kspec) > 2 else (None,) if stacked else ()  # (L,) or (L, E)
    d_in_ax = kspec[-2] if len(kspec) >= 2 else None
    d_out_ax = kspec[-1] if len(kspec) >= 1 else None
    stem = leaf.rstrip("0123456789")
    spec = P()
    if stem.endswith("_a") and nd == len(lead) + 2:
      spec = P(*lead, d_in_ax, None)
    elif stem.endswith("_b") and nd == len(lead) + 2:
      spec = P(*lead, None, d_out_ax)
    elif len(kshape) >= 2 and nd == len(lead) + 1:
      if leaf in OUT_VECTORS and x.shape[-1] == kshape[-1]:
        spec = P(*lead, d_out_ax)
      elif leaf in IN_VECTORS and x.shape[-1] == kshape[-2]:
        spec = P(*lead, d_in_ax)
    out[path] = NamedSharding(mesh, fit_spec(spec, tuple(x.shape), mesh))
  return pytree.unflatten(out)


def key_name(k) -> str:
  """One key of a jax key path as a path part (dict key, attribute name or sequence index)."""
  return str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))


def follow(shapes_tree, like: dict, mesh: Mesh):
  """Shardings for every leaf of `shapes_tree` (e.g. an optimizer state, from `jax.eval_shape`):
  the sharding of the array of `like` ({"/"-joined path: placed array}, e.g. the trainable
  leaves) whose path ends the leaf's own path, with the same shape (AdamW's mu and nu of a
  weight are split as the weight), else replicated (step counts, factored second moments).
  Without it, an optimizer state built under jit from zeros is replicated on every device."""
  def one(path, x):
    parts = [key_name(k) for k in path]
    for i in range(len(parts)):
      a = like.get("/".join(parts[i:]))
      if a is not None and tuple(a.shape) == tuple(x.shape):
        return a.sharding
    return NamedSharding(mesh, P())
  return jax.tree_util.tree_map_with_path(one, shapes_tree)
