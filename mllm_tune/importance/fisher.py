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

An example is one sample of a training batch with its own images (`examples.py`).

Files (`store.py`): `save_importance` / `load_importance`.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from mllm_tune import pytree
from mllm_tune.models.mesh_axes import BATCH_AXES
from mllm_tune.importance.errors import ImportanceError
from mllm_tune.importance.examples import (  # noqa: F401 (re-exported)
    TOKEN_FIELDS, VISION_IDS, LogitsFn, collect_examples, examples_batch, image_spec,
    lm_logits_fn, per_process, split_examples, stack_examples)

KINDS = ("empirical", "true", "mas")
META_FILE = "importance.json"
FORMAT = "mllm_tune.importance/1"


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


def _engine(logits_fn: LogitsFn, kind: str):
  """The jitted engine of `importance` for one logits function and kind. Those of
  `lm_logits_fn` (one per model) keep theirs in their `engines` dict, so every importance of a
  model shares one compile (e.g. online EWC's refreshes); any other function gets a new one."""
  engines = getattr(logits_fn, "engines", None)
  engines = engines if isinstance(engines, dict) else {}
  if kind not in engines:
    engines[kind] = per_example_sums(example_objective(logits_fn, kind),
                                     "abs" if kind == "mas" else "square")
  return engines[kind]


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


def _process_chunk(mesh, chunk: int, procs: int) -> int:
  """Examples per chunk from each of `procs` processes: their chunks together split over the
  mesh's batch axes, which must span the processes (each holds whole shards)."""
  if mesh is None:
    raise ImportanceError("an importance over several processes needs the mesh (mesh=...)")
  shards = math.prod(mesh.shape.get(a, 1) for a in BATCH_AXES)
  if shards % procs:
    raise ImportanceError(f"an importance over {procs} processes splits its examples over the "
                          f"mesh's batch axes {BATCH_AXES}, but they have {shards} shards")
  per = shards // procs                # batch shards on each process
  share = -(-chunk // procs)           # ceil(chunk / procs), rounded up to whole shards
  local = -(-share // per) * per
  # each process's devices must hold `local` examples of the chunk axis, no two processes the
  # same ones (a batch shard split between processes, e.g. over `tensor`, cannot be assembled)
  owners: dict[tuple, set] = {}
  sharding = _example_sharding(mesh, local * procs, 2)
  for device, idx in sharding.devices_indices_map((1, local * procs)).items():
    owners.setdefault(tuple(idx[1].indices(local * procs)[:2]), set()).add(device.process_index)
  held = {p: sum(b - a for (a, b), o in owners.items() if p in o) for p in range(procs)}
  if any(len(o) > 1 for o in owners.values()) or set(held.values()) != {local}:
    raise ImportanceError(f"an importance over {procs} processes needs each process's devices "
                          f"to hold whole batch shards of their own; this mesh's shards "
                          f"{sorted(owners)} are held by processes "
                          f"{[sorted(o) for _, o in sorted(owners.items())]}")
  return local


def importance(logits_fn: LogitsFn, variables: dict, leaves: dict, examples: dict,
               kind: str = "empirical", chunk: int = 8, rng: jax.Array | None = None,
               mesh=None, chunks_per_call: int = 8) -> dict[str, jax.Array]:
  """{variables path: float32 importance shaped like the leaf} over the leaves the mask tree
  `leaves` selects. `examples`: arrays with a leading example axis N (see `stack_examples`).
  N is padded to whole chunks with zero-weight copies; one compile for all calls.

  With several processes, `examples` are this process's (the same shapes on every process,
  `collect_examples`), `mesh` spans the processes, and every process calls this: each chunk
  takes ~chunk / processes examples from each, the sums run over all of them, and the mean
  divides by their total count."""
  n = _num_examples(examples)
  procs = jax.process_count()
  counts = [n] if procs == 1 else _count_per_process(n)
  if min(counts) == 0:
    raise ImportanceError("no examples to compute the importance from")
  train, frozen = pytree.partition(variables, leaves)
  if not pytree.flatten(train):
    raise ImportanceError("the leaf mask selects no leaf to compute the importance of")
  engine = _engine(logits_fn, kind)
  local = chunk if procs == 1 else _process_chunk(mesh, chunk, procs)
  n_chunks = -(-max(counts) // local)
  calls = -(-n_chunks // chunks_per_call)
  per_call = -(-n_chunks // calls)  # balanced: under one padded chunk per call
  total = calls * per_call * local
  pad = np.zeros(total, np.int64)
  pad[:n] = np.arange(n)
  valid = (np.arange(total) < n).astype(np.float32)
  rng = jax.random.key(0) if rng is None else rng
  keys = jax.random.split(jax.random.fold_in(rng, jax.process_index()) if procs > 1 else rng,
                          total)

  def put(x, ndim):  # (per_call, local, ...) -> on the mesh, the processes' parts side by side
    if mesh is None:
      return x
    sharding = _example_sharding(mesh, local * procs, ndim)
    if procs == 1:
      return jax.device_put(x, sharding)
    return jax.make_array_from_process_local_data(
        sharding, np.asarray(x), (x.shape[0], local * procs) + tuple(x.shape[2:]))

  acc = jax.tree.map(lambda x: jnp.zeros_like(x, jnp.float32), train)
  for c in range(calls):
    idx = pad[c * per_call * local:(c + 1) * per_call * local]
    ex = {k: np.asarray(v)[idx] for k, v in examples.items()}
    ex["_valid"] = valid[c * per_call * local:(c + 1) * per_call * local]
    ex = {k: put(v.reshape((per_call, local) + v.shape[1:]), v.ndim + 1) for k, v in ex.items()}
    k = keys[c * per_call * local:(c + 1) * per_call * local].reshape((per_call, local))
    if procs > 1:  # as raw key data: the processes' keys side by side, then typed again
      k = jax.random.wrap_key_data(put(jax.random.key_data(k), 3), impl=jax.random.key_impl(rng))
    elif mesh is not None:
      k = jax.device_put(k, _example_sharding(mesh, local, 2))
    acc = engine(train, frozen, acc, ex, k)
  return {p: x / sum(counts) for p, x in pytree.flatten(acc).items()}


def _count_per_process(n: int) -> list[int]:
  return [int(c) for c in per_process([n])[:, 0]]


def fisher_from_batches(model, variables: dict, leaves: dict, batches,
                        kind: str = "empirical", num_examples: int = 512, chunk: int = 8,
                        rng: jax.Array | None = None, mesh=None) -> tuple[dict, int]:
  """Importance of `kind` (empirical | true | mas) of a model over the first `num_examples`
  samples of `batches` (an iterable, or a function returning one) -> ({variables path:
  importance}, number of samples used). With several processes every process calls it with its
  own `batches` and takes its share of the samples (`collect_examples`); the count is over all
  of them."""
  tok, seq = image_spec(model)
  examples = collect_examples(batches, num_examples, tok, seq)
  n = _num_examples(examples)
  n = n if jax.process_count() == 1 else sum(_count_per_process(n))
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
