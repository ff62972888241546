"""The trainer's forgetting penalty: its importance (loaded, or computed and saved) and GIFT's
synthetic caption batches. Called once by `Trainer.__init__`, with what each step needs.

Importance (Fisher / MAS) comes from `penalty.fisher_path` if it exists (checked against this
model and base), else it is computed on theta0 over the leaves the method changes from
`fisher_data` (default: the first training batches, rewound) and saved there (default
`run_dir/importance/<kind>`, reused on resume).
"""
from __future__ import annotations

import logging
import os
import time

import jax
import numpy as np

from mllm_tune import pytree, tuning
from mllm_tune.train import setup
from mllm_tune.importance import examples as importance_examples
from mllm_tune.importance import fisher as fisher_lib
from mllm_tune.importance import store as importance_store
from mllm_tune import penalties as penalty_lib

log = logging.getLogger(__name__)


def setup_penalty(cfg, model, method, params: dict, variables: dict, *, base_path: str,
                  base_fingerprint: str, fisher_data=None, train_data=None, mesh=None):
  """`cfg.penalty` -> (bound penalty or combination, host consts) or (None, None). The importance
  of its importance-weighted penalty (ewc, online_ewc, mas; one per run) comes
  from `penalty.fisher_path` if it exists (checked against this model and base), else it is
  computed on theta0 over the leaves the method changes and saved there (default
  `run_dir/importance/<kind>`; `auto`: beside the base checkpoint). Online EWC adds
  gamma * `penalty.prev_fisher_path` and saves the sum to `run_dir/importance/online_ewc`.
  Importance is computed from `fisher_data` (batches, or a factory `model -> batches`), else
  from `train_data` (rewound afterwards)."""
  pcfg = cfg.get("penalty")
  if pcfg is None or pcfg.name.strip() == "none":
    return None, None
  try:
    penalty = penalty_lib.from_config(pcfg)
  except penalty_lib.PenaltyError as e:
    raise setup.ConfigValueError(f"config 'penalty': {e}") from e
  scores, where = None, "importance"
  src = penalty_lib.importance_source(penalty)  # the (member) penalty weighing by importance
  if src is not None:
    kind = "mas" if src.importance == "mas" else src.fisher_kind
    path = pcfg.fisher_path or os.path.join(cfg.run_dir, "importance", kind)
    if path == "auto":
      if not os.path.isdir(base_path):
        raise setup.ConfigValueError(f"config 'penalty.fisher_path': 'auto' stores the "
                                     f"importance beside the base checkpoint, but the base "
                                     f"'{base_path}' is not a directory")
      path = importance_store.default_path(base_path, kind)
    shapes = {"params/" + p: tuple(x.shape) for p, x in pytree.flatten(params).items()}
    sh = {"params/" + p: x.sharding for p, x in pytree.flatten(params).items()}
    check = dict(expect_shapes=shapes, model_config=model.config, shardings=sh)
    if _on_file(os.path.join(path, fisher_lib.META_FILE)):
      scores = load_on_every_process(path, base_fingerprint=base_fingerprint, **check)
      log.info("penalty %s: importance loaded from %s", src.name, path)
    else:
      scores = compute_importance(pcfg, kind, model, method, params, variables, path,
                                    base_path, base_fingerprint, fisher_data, train_data, mesh)
    where = f"importance file {path}"
    if src.name == "online_ewc" and pcfg.get("prev_fisher_path"):
      prev = load_on_every_process(pcfg.prev_fisher_path, **check)
      scores = fisher_lib.online_update(prev, scores, src.gamma)
      importance_store.save_importance(
          os.path.join(cfg.run_dir, "importance", "online_ewc"), scores, kind=kind,
          model_config=model.config, base_fingerprint=base_fingerprint,
          base_path=base_path, extra={"gamma": src.gamma,
                                           "prev": os.path.abspath(pcfg.prev_fisher_path)})
  return penalty_lib.bind(penalty, method, variables, base_params=params,
                          importance=scores, where=where, model=model, refreshed_in_run=True)


def load_on_every_process(path: str, **check) -> dict:
  """`store.load_importance(path, **check)`'s scores. With several processes the file's
  metadata is read and checked on each first, and a process that cannot (e.g. a filesystem
  not shared between the hosts, where process 0 found the file) makes every process raise,
  naming it, before the restore's collectives (which would otherwise wait on it)."""
  if jax.process_count() > 1:
    local: dict = {}
    meta_check = {k: v for k, v in check.items() if k != "shardings"}
    _, err = importance_examples.shared_call(
        lambda: importance_store.read_meta(path, **meta_check), local)
    importance_examples.raise_shared(local, err, what=f"importance file {path}")
  return importance_store.load_importance(path, **check)[0]


def _on_file(meta_path: str) -> bool:
  """Whether the importance file exists, as process 0 sees it (every process then loads, or
  every process computes: the computation is collective)."""
  here = os.path.isfile(meta_path)
  if jax.process_count() == 1:
    return here
  from jax.experimental import multihost_utils
  return bool(multihost_utils.broadcast_one_to_all(np.int32(here)))


def setup_penalty_data(cfg, model, penalty, mesh=None):
  """GIFT's synthetic caption batches (`data.synthetic_pairs.PairBatches`) or None. They are
  prepared like the training data, from the tokenizer and image processor in `model.path`
  (model.source=hf); the tiny random model has none, so gift refuses it here [choice: no
  made-up token fallback] rather than train on captions it cannot tokenize. With `mesh`, their
  image buffers split over its data-parallel shards (`setup.row_groups`)."""
  if penalty is None or penalty.name != "gift" or not penalty.active:
    return None
  from mllm_tune.data.pipeline import SamplePreparer
  from mllm_tune.data.synthetic_pairs import PairBatches, make_pair_source
  c, s = cfg, cfg.penalty.synthetic
  if c.model.source != "hf" or not hasattr(model.config, "image_token_id"):
    raise setup.ConfigValueError(
        "config 'penalty': gift turns synthetic image-caption pairs into LLaVA conversations "
        "with the tokenizer, chat template and image processor of the training data, read "
        f"from model.path; model.source={c.model.source!r}"
        + (" has none" if c.model.source != "hf" else " is not a LLaVA (vision) model")
        + ": use an HF LLaVA directory (model.source=hf), or another penalty")
  source = make_pair_source(s.kind, s.path, s.num, "train", s.seed, s.image_size)
  prepare = SamplePreparer.from_pretrained(
      c.model.path, model.config, s.seq_len or c.data.seq_len, c.data.get("template"),
      "truncate", c.data.get("aspect"))
  pad_id = getattr(prepare.chat.tokenizer, "pad_token_id", None) or 0
  size = s.batch_size or c.data.batch_size
  groups = 1 if mesh is None else setup.row_groups(mesh, size // jax.process_count())
  batches = PairBatches(source, prepare, size, s.seed, s.prompt, pad_id, jax.process_index(),
                        jax.process_count(), image_groups=groups)
  log.info("penalty gift: %d synthetic pairs (%s), %d per step, rows of %d tokens",
           len(source), s.kind, batches.batch_size, batches.spec.max_len)
  return batches

def changed_leaves(method, variables: dict, params: dict) -> tuple[dict, list[str]]:
  """({"params": bool tree, "adapters": {}}, paths): the base leaves `method` changes, the
  ones a penalty's importance (Fisher / MAS) is computed for."""
  changed, _, _ = penalty_lib.penalisable(method, variables)
  flat = {p: p in changed for p in pytree.flatten({"params": params})}
  leaves = pytree.unflatten(flat)
  leaves["adapters"] = {}
  return leaves, list(changed)


def compute_importance(pcfg, kind: str, model, method, params: dict, variables: dict, path: str,
                       base_path: str, base_fingerprint: str, fisher_data=None, train_data=None,
                       mesh=None) -> dict:
  """Importance of the leaves `method` changes, on theta0, saved at `path`."""
  leaves, changed = changed_leaves(method, variables, params)
  if not changed:
    raise setup.ConfigValueError(f"config 'penalty': method '{tuning.api.label(method)}' "
                                 "changes no base leaf to compute an importance for")
  t0 = time.time()
  scores, n = importance_on(pcfg, kind, model, {"params": params, "adapters": {}}, leaves,
                            jax.random.key(pcfg.fisher_seed), fisher_data, train_data, mesh)
  log.info("penalty %s: %s importance of %d leaves from %d samples in %.1fs -> %s",
           pcfg.name, kind, len(scores), n, time.time() - t0, path)
  importance_store.save_importance(path, scores, kind=kind, model_config=model.config,
                             base_fingerprint=base_fingerprint, base_path=base_path,
                             num_examples=n)
  return scores


def importance_on(pcfg, kind: str, model, variables: dict, leaves: dict, rng,
                  fisher_data=None, train_data=None, mesh=None) -> tuple[dict, int]:
  """(importance of `kind` of the `leaves` mask's leaves of `variables`, samples used), from
  `penalty.fisher_samples` samples of `fisher_data` (batches, or a factory `model -> batches`),
  else of the next training batches (`train_data` is rewound afterwards)."""
  rewind = []  # the training data's state, to restore after reading batches from it
  made = []  # pipelines built here from a factory, closed afterwards (prefetch threads)

  def batches():  # called where a process's failure is shared with the others (collect_examples)
    data = fisher_data
    if callable(data) and not hasattr(data, "__next__"):
      data = data(model)
      made.append(data)
    if data is None:
      rewind.append(train_data.get_state())
      data = _unstacked(train_data)  # with train.grad_accum > 1: each micro-batch in turn
    return iter(data)

  try:
    return fisher_lib.fisher_from_batches(model, variables, leaves, batches, kind,
                                          pcfg.fisher_samples, pcfg.fisher_chunk, rng, mesh)
  finally:
    if rewind:
      train_data.set_state(rewind[0])
    for data in made:
      if hasattr(data, "close"):
        data.close()


def _unstacked(batches):
  """Batches with a micro-batch axis ((A, B, T) ids, `train.grad_accum` > 1) as their A
  micro-batches one after another; other batches as they are."""
  for b in batches:
    if np.ndim(b["input_ids"]) == 3:
      yield from ({k: v[i] for k, v in b.items()} for i in range(np.shape(b["input_ids"])[0]))
    else:
      yield b

