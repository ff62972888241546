"""Config -> objects: model and params, method and variables, optimizer, shardings, data.

Everything here is construction; the step is in `step.py` and the loop in `loop.py`.
"""
from __future__ import annotations

import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from mllm_tune import tuning
from mllm_tune.models import build_model, init_params
from mllm_tune.models.adapters import PREFIX_MLP_B1, PREFIX_MLP_B2
from mllm_tune.models.config import (CausalLMConfig, LLMConfig, LlavaConfig, VisionConfig,
                                     with_runtime)
from mllm_tune.train import sharding as shard_lib

log = logging.getLogger(__name__)


class ConfigValueError(ValueError):
  """A config value is missing or invalid; the message names the key."""


def _runtime(c) -> dict:
  """Runtime fields of the `model` section (configs saved before a field existed lack it)."""
  return {"attention_impl": c.get("attention_impl", "auto"),
          # always: a native base saved by a run with a factor carries it in its config
          "moe_capacity_factor": float(c.get("moe_capacity_factor", 0.0))}


def tiny_model_config(c) -> LlavaConfig | CausalLMConfig:
  """`model.source = "tiny"`: a random-init model from `model.tiny` fields (tests, demos)."""
  t = c.tiny
  llm = LLMConfig(vocab_size=t.vocab_size, hidden_size=t.hidden_size,
                  intermediate_size=t.intermediate_size, num_layers=t.num_layers,
                  num_heads=t.num_heads, num_kv_heads=t.num_kv_heads,
                  head_dim=t.hidden_size // t.num_heads, dtype=c.dtype,
                  param_dtype=c.param_dtype, remat_policy=c.remat_policy)
  if not t.vision_layers:
    return with_runtime(CausalLMConfig(llm=llm), **_runtime(c))
  vis = VisionConfig(hidden_size=t.vision_hidden_size, intermediate_size=2 * t.vision_hidden_size,
                     num_layers=t.vision_layers, num_heads=max(1, t.vision_hidden_size // 16),
                     image_size=t.image_size, patch_size=t.patch_size, dtype=c.dtype,
                     param_dtype=c.param_dtype)
  return with_runtime(LlavaConfig(vision=vis, llm=llm, image_token_id=t.vocab_size - 1),
                      **_runtime(c))


def reads_model_files(cfg) -> bool:
  """Does the run read the model directory's tokenizer / image processor (LLaVA-format data,
  target or retention sets, GIFT's synthetic captions)?"""
  e, p = cfg.get("eval"), cfg.get("penalty")
  sets = e is not None and any(len(e.get(r) or {}) for r in ("target", "retention"))
  return (cfg.data.kind != "synthetic" or sets
          or (p is not None and p.get("name", "none") == "gift"))


def check_model_files(cfg) -> None:
  """Before any weight is read (`mllm-tune train`, `Trainer`): an HF model directory's
  config.json and weight files and, when the run reads them (`reads_model_files`), its
  tokenizer, chat template and image processor, loaded as the data pipeline will load them
  (`SamplePreparer.from_pretrained`, either image-processor layout). Errors name the file and
  field, so a bad directory fails in seconds instead of after loading the weights."""
  c = cfg.model
  if c.source != "hf" or not c.path:
    return
  import os
  from mllm_tune.checkpoints.hf import INDEX_FILE, SINGLE_FILE, read_config
  from mllm_tune.checkpoints.safetensors_io import CheckpointError
  model_config = read_config(c.path)
  if not any(os.path.isfile(os.path.join(c.path, f)) for f in (SINGLE_FILE, INDEX_FILE)):
    raise CheckpointError(f"{c.path}: no {SINGLE_FILE} or {INDEX_FILE} found")
  if not reads_model_files(cfg):
    return
  from mllm_tune.data.conversation import ChatTokenizer
  from mllm_tune.data.pipeline import SamplePreparer
  from mllm_tune.data.templates import load_tokenizer
  d = cfg.data
  if isinstance(model_config, LlavaConfig):
    SamplePreparer.from_pretrained(c.path, model_config, int(d.get("seq_len", 2048)),
                                   d.get("template"), aspect=d.get("aspect"))
  else:
    ChatTokenizer(load_tokenizer(c.path), -1, 0, d.get("template"))


def _check_source(c) -> None:
  """`model.source` is one we load, and a checkpoint source names its directory."""
  if c.source not in ("hf", "native", "tiny"):
    raise ConfigValueError(f"model.source must be 'hf', 'native' or 'tiny', got {c.source!r}")
  if c.source != "tiny" and not c.path:
    raise ConfigValueError("model.path is empty (set --config.model.path=HF_OR_NATIVE_DIR)")


def read_model_config(c):
  """The model config the `model` section names, without loading its weights."""
  from mllm_tune.checkpoints.hf import read_config
  from mllm_tune.checkpoints.native import read_native_config
  _check_source(c)
  if c.source == "tiny":
    return tiny_model_config(c)
  return read_config(c.path) if c.source == "hf" else read_native_config(c.path)


def check_expert_mesh(model_config, mesh, capacity_factor: float = 0.0) -> None:
  """`mesh.expert` > 1 needs a mixture-of-experts LLM whose expert count it divides;
  `model.moe_capacity_factor` > 0 bounds the expert-parallel dispatch, so it needs
  `mesh.expert` > 1 (without it nothing would be dropped: refused rather than ignored)."""
  ep = mesh.shape.get("expert", 1)
  if capacity_factor and ep == 1:
    raise ConfigValueError(
        f"config key 'model.moe_capacity_factor' = {capacity_factor}: it bounds the buffer of "
        "expert parallelism's dispatch and applies only with mesh.expert > 1 (without expert "
        "parallelism the dispatch is dropless and has no slack to bound); set it to 0 or "
        "split the experts with mesh.expert")
  experts = getattr(getattr(model_config, "llm", None), "num_experts", 0) or 0
  if ep > 1 and (not experts or experts % ep):
    raise ConfigValueError(
        f"config key 'mesh.expert' = {ep}: " + (
            f"the model's {experts} experts do not split into {ep} equal groups" if experts
            else "the model has no mixture-of-experts layers (put those devices on "
                 "mesh.data or mesh.fsdp)"))


def load_model(c, sharding_fn=None):
  """-> (model, params, base_path) from the `model` config section."""
  from mllm_tune.checkpoints.hf import load_pretrained
  from mllm_tune.checkpoints.native import load_native
  _check_source(c)
  if c.source == "tiny":
    model = build_model(tiny_model_config(c))
    params = init_params(model, jax.random.key(c.tiny.seed))
    if sharding_fn is not None:
      params = jax.tree_util.tree_map_with_path(
          lambda p, x: jax.device_put(x, sharding_fn("/".join(k.key for k in p), x.shape)),
          params)
    return model, params, f"tiny:{c.tiny.seed}"
  if c.source == "hf":
    model, params = load_pretrained(c.path, dtype=c.dtype, param_dtype=c.param_dtype,
                                    sharding_fn=sharding_fn, remat_policy=c.remat_policy,
                                    **_runtime(c))
  else:
    model, params = load_native(c.path, sharding_fn=sharding_fn)
    model = build_model(with_runtime(model.config, dtype=c.dtype, remat_policy=c.remat_policy,
                                     **_runtime(c)))
  return model, params, c.path


def make_schedule(o, total_steps: int):
  if o.learning_rate <= 0:
    raise ConfigValueError(f"optimizer.learning_rate must be > 0, got {o.learning_rate}")
  if o.schedule == "constant":
    main = optax.constant_schedule(o.learning_rate)
  elif o.schedule == "cosine":
    main = optax.cosine_decay_schedule(o.learning_rate, max(1, total_steps - o.warmup_steps))
  elif o.schedule == "linear":
    main = optax.linear_schedule(o.learning_rate, 0.0, max(1, total_steps - o.warmup_steps))
  else:
    raise ConfigValueError(f"optimizer.schedule must be constant|cosine|linear, got "
                           f"{o.schedule!r}")
  if o.warmup_steps:
    warm = optax.linear_schedule(0.0, o.learning_rate, o.warmup_steps)
    return optax.join_schedules([warm, main], [o.warmup_steps])
  return main


NO_DECAY_LEAVES = (PREFIX_MLP_B1, PREFIX_MLP_B2)  # biases whose names do not say so


def decays(path: str) -> bool:
  """Whether AdamW's weight decay applies to the leaf at `path` ("params/..." or
  "adapters/..."), with transformers Trainer's rule (`get_decay_parameter_names`): not to
  biases and not to normalization weights. Ours are named `*bias*` (bias, patch_bias,
  lora_bias, extra_bias, ...) and live in modules named `*norm*` or `ln_*` (norm1, post_norm,
  input_norm, q_norm, the Qwen merger's ln_q) [choice: every normalization weight; Trainer's
  own rule misses RMSNorms its names do not spell: it decays Qwen2.5-VL's vision norm1, norm2
  and ln_q]."""
  *modules, leaf = path.split("/")
  if "bias" in leaf or leaf in NO_DECAY_LEAVES:
    return False
  return not any("norm" in m or m.startswith("ln_") for m in modules)


def decay_mask(tree):
  """`decays` over a (trainable) variables tree, any structure kept (optax's masked nodes):
  the mask `masked_decay` applies."""
  return jax.tree_util.tree_map_with_path(
      lambda kp, _: decays("/".join(shard_lib.key_name(k) for k in kp)), tree)


def masked_decay(weight_decay: float, mask_fn) -> optax.GradientTransformation:
  """`optax.add_decayed_weights` on the leaves `mask_fn(updates)` marks, with its (empty) state:
  an optimizer state shaped as optax.adamw's without a mask, so checkpoints of either rule
  restore with the other (optax's `mask=` would add a MaskedState node)."""
  base = optax.add_decayed_weights(weight_decay)

  def update(updates, state, params=None):
    if params is None:
      raise ValueError("masked_decay needs the params")
    keep = mask_fn(updates)
    return jax.tree.map(lambda g, p, d: g + weight_decay * p if d else g, updates, params,
                        keep), state
  return optax.GradientTransformation(base.init, update)


def make_optimizer(o, total_steps: int):
  """-> (optax transform incl. clipping, lr schedule). `o.decay_on`: "hf_trainer" (default:
  transformers Trainer's rule, `decays`) | "all" (optax's default: every trained leaf)."""
  lr = make_schedule(o, total_steps)
  decay_on = o.get("decay_on", "hf_trainer")
  if decay_on not in ("hf_trainer", "all"):
    raise ConfigValueError(f"optimizer.decay_on must be hf_trainer|all, got {decay_on!r}")
  if o.name not in ("adamw", "sgd", "adafactor"):
    raise ConfigValueError(f"optimizer.name must be adamw|sgd|adafactor, got {o.name!r}")
  if o.name != "adamw" and o.get("weight_decay", 0.0):
    log.warning("optimizer.weight_decay=%g is ignored by optimizer.name=%s (AdamW only)",
                o.weight_decay, o.name)
  if o.name == "sgd":
    opt = optax.sgd(lr, momentum=o.momentum or None)
  elif o.name == "adafactor":
    opt = optax.adafactor(lr)
  elif decay_on == "all":
    opt = optax.adamw(lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay)
  else:  # optax.adamw's chain, the decay masked by `decays`
    opt = optax.chain(optax.scale_by_adam(b1=o.b1, b2=o.b2, eps=o.eps),
                      masked_decay(o.weight_decay, decay_mask),
                      optax.scale_by_learning_rate(lr))
  if o.clip_norm:
    opt = optax.chain(optax.clip_by_global_norm(o.clip_norm), opt)
  return opt, lr


def cast_tree(tree: dict, dtype) -> dict:
  return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                      tree)


def batch_sharding(mesh, grad_accum: int) -> NamedSharding:
  axis = shard_lib.BATCH_AXES
  return NamedSharding(mesh, P(None, axis) if grad_accum > 1 else P(axis))


# batch fields indexed by image slot (LLaVA images, anyres crops, Qwen patches), not by row
IMAGE_FIELDS = ("pixel_values", "image_valid", "vision_segment_ids", "vision_pos_hw",
                "vision_window_ids")


def _is_qwen(model_config) -> bool:
  return hasattr(getattr(model_config, "vision", None), "merge_unit")


def image_sharding(sh: NamedSharding, batch: dict, key: str, model_config, processes: int
                   ) -> NamedSharding:
  """The sharding of an image-buffer field: its slot axis (after any micro-batch axis) split
  like the rows, so each device runs the vision tower on its part of the images (LLaVA image
  slots and anyres crops are encoded one by one; Qwen patch blocks, `data.image_groups`, hold
  the images of one shard's rows). Replicated: a flat Qwen patch buffer (its images attend
  across the whole axis) and slot counts the shards do not divide (`sharding.fit_spec`)."""
  lead = len(tuple(sh.spec)) - 1  # 1 with a micro-batch axis
  if _is_qwen(model_config) and np.ndim(batch["pixel_values"]) == 2 + lead:
    return NamedSharding(sh.mesh, P())
  shape = list(np.shape(batch[key]))
  shape[lead] *= processes  # the global buffer: the hosts' buffers joined in process order
  out = NamedSharding(sh.mesh, shard_lib.fit_spec(sh.spec, tuple(shape), sh.mesh))
  if processes > 1 and any(tuple(out.spec)):
    # pack_index counts host r's slots from r * n (`rebase_for_host`): every host's devices
    # must hold exactly its span, else (the same answer on every host) the buffer is gathered
    # in process order instead
    n, spans = shape[lead] // processes, {}
    for device, idx in out.devices_indices_map(tuple(shape)).items():
      a, b = idx[lead].indices(shape[lead])[:2]
      lo, hi = spans.get(device.process_index, (a, b))
      spans[device.process_index] = (min(lo, a), max(hi, b))
    if any(span != (r * n, (r + 1) * n) for r, span in spans.items()):
      return NamedSharding(sh.mesh, P())
  return out


def field_sharding(sh: NamedSharding, key: str, ndim: int, ids_ndim: int | None
                   ) -> NamedSharding:
  """The row sharding `sh` of a batch field: Qwen2-VL's M-RoPE `positions` (3, B, T) (one
  axis more than `input_ids`) put the row axis second, after any micro-batch axis."""
  if key == "positions" and ids_ndim is not None and ndim == ids_ndim + 1:
    spec = tuple(sh.spec)  # (rows,) or (None, rows) with a micro-batch axis
    return NamedSharding(sh.mesh, P(*spec[:-1], None, spec[-1]))
  return sh


def row_groups(mesh, rows: int) -> int:
  """The data-parallel shards (data x fsdp x expert) of one host's `rows`, 1 when they do not
  split evenly: as `data.image_groups`, each device then encodes only its rows' images."""
  shards, hosts = shard_lib.batch_shards(mesh), jax.process_count()
  per_host = shards // hosts if shards % hosts == 0 else 1
  return per_host if rows % per_host == 0 else 1


def place_batch(batch: dict, sh: NamedSharding, model_config) -> tuple[dict, tuple | None]:
  """Host batch (this process's slice) -> (global arrays, the image buffer's shape when it is
  replicated, else None). Rows are sharded by `sh` over (data, fsdp, expert): axis 0 of (B, ...)
  fields, axis 1 of Qwen2-VL's (3, B, T) M-RoPE `positions` (after the micro-batch axis with
  grad accumulation). Image buffers (pixel values, patch ids) are split the same way on their
  slot axis (`image_sharding`), else replicated, every host's joined in process order."""
  out, replicated = {}, None
  ids_ndim = np.ndim(batch["input_ids"]) if "input_ids" in batch else None
  hosts = jax.process_count()
  if hosts > 1:
    batch = global_part(batch, model_config, jax.process_index(), len(tuple(sh.spec)) - 1)
  for k, v in batch.items():
    v = np.asarray(v)
    if k in IMAGE_FIELDS:
      k_sh = image_sharding(sh, batch, k, model_config, hosts)
      if not any(tuple(k_sh.spec)):
        if k == "pixel_values":
          replicated = v.shape
        if hosts > 1:
          from jax.experimental import multihost_utils
          v = np.asarray(multihost_utils.process_allgather(v, tiled=True))
        out[k] = jax.device_put(v, k_sh)
        continue
    else:
      k_sh = field_sharding(sh, k, v.ndim, ids_ndim)
    out[k] = (jax.make_array_from_process_local_data(k_sh, v) if hosts > 1
              else jax.device_put(v, k_sh))
  return out, replicated


def global_part(batch: dict, model_config, rank: int, lead: int = 0) -> dict:
  """Host `rank`'s batch as its part of the global batch, where the hosts' image buffers are
  joined in process order: a flat Qwen patch buffer becomes one block (no image crosses hosts)
  and indices into the image buffer are rebased (`rebase_for_host`). `lead`: 1 with a
  micro-batch axis."""
  if (_is_qwen(model_config) and "pixel_values" in batch
      and np.ndim(batch["pixel_values"]) == 2 + lead):
    batch = {k: np.expand_dims(v, lead) if k in IMAGE_FIELDS else v for k, v in batch.items()}
  return {k: rebase_for_host(model_config, k, np.asarray(v), batch, rank)
          for k, v in batch.items()}


def rebase_for_host(model_config, key: str, v: np.ndarray, batch: dict, rank: int
                    ) -> np.ndarray:
  """Indices into one host's image buffer -> into the gathered buffer, where the hosts before
  `rank` come first (every host uses the same buffer size, data/loader.py): `pack_index` rows
  of the image features (anyres: crops x features per crop; Qwen2-VL: patches / m^2) and
  Qwen's per-image `vision_segment_ids` (kept apart from other hosts' images)."""
  if key == "pack_index":  # (B, T, K), or (A, B, T, K) with a micro-batch axis
    lead = v.ndim - 3
    shape = np.shape(batch["pixel_values"])[lead:]  # one micro-batch's buffer
    per_host = (math.prod(shape[:-1]) // model_config.vision.merge_unit if _is_qwen(model_config)
                else shape[0] * model_config.crop_side ** 2)  # Qwen: (P, X) or blocks (G, K, X)
    return v + rank * per_host
  if key == "vision_segment_ids":
    return np.where(v > 0, v + rank * v.size, 0).astype(v.dtype)
  return v


def method_from(c) -> tuning.Method:
  try:
    return tuning.from_config(c)
  except tuning.MethodError as e:
    raise ConfigValueError(f"config 'method': {e}") from e
