"""In-run evaluation of both sides: target sets and retention sets, and divergence from θ0.

Every set is prepared once into fixed-shape arrays (`bench.arrays.VqaArrays`, the same
preparation the benchmark uses) and scored two ways:
- task metric `vqa`: greedy generation from the record's generation prompt (the turns before
  its answer + the chat template's generation prompt, `VqaArrays.prompts`), VQA
  accuracy against the reference (percent; `bench.evaluate`, so the numbers equal the
  benchmark's after-the-fact evaluation of the same weights). With several families in a set
  (the general mix), the set score is the mean of the per-family scores (docs/methods.md §8: Ā_up);
  `token`: teacher-forced top-1 accuracy on the answer tokens (percent), no generation.
- on retention sets, one jitted teacher-forced pass computes the tuned model's and the base
  θ0's logits on the reference records and returns, over the answer positions
  (`kl_tokens="supervised"`) or every real position (`"all"`):
  kl = mean_t KL(p_θ0(·|<t) ‖ p_θ(·|<t)) (nats), agree = mean_t [argmax p_θ = argmax p_θ0],
  and the tuned model's loss / token_acc (target sets: the task score only, which keeps the
  eval cheap; a `token`-metric target set gets the tuned-model pass).
Keys (`eval/<role>/<set>[/<sub>]`) are those `eval/selection.py` and `eval/run_report.py` read.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from mllm_tune.eval import vqa_sets as arrays_lib
from mllm_tune.eval import vqa_eval as bench_eval
from mllm_tune.losses.distill import token_kl
from mllm_tune.losses.token import token_logprobs
from mllm_tune.models import model_kwargs

ROLES = ("target", "retention")
KINDS = ("offline", "llava_json", "tfds")
METRICS = ("vqa", "token")


class EvalSetError(ValueError):
  """An eval set that does not exist, is empty, or is ill-configured (the key is named)."""


@dataclasses.dataclass(frozen=True)
class EvalSet:
  name: str
  role: str                      # target | retention
  arrays: arrays_lib.VqaArrays
  metric: str                    # vqa | token

  @property
  def key(self) -> str:
    return f"eval/{self.role}/{self.name}"


def _source(spec, key: str, image_size: int):
  from mllm_tune.data import offline_vqa as ov
  if spec.kind == "offline":
    try:
      if spec.source == "digits":
        return ov.DigitsSource(spec.split, image_size, seed=spec.seed)
      return ov.make_source(spec.source, spec.split, image_size, spec.num or None, spec.seed)
    except ValueError as e:
      raise EvalSetError(f"config key '{key}.source': {e}") from e
  if spec.kind in ("llava_json", "tfds"):
    from mllm_tune.data.sources import LlavaJsonSource, TfdsSource, build_tfds
    if not spec.json_path or not os.path.isfile(spec.json_path):
      raise EvalSetError(f"config key '{key}.json_path': no such file {spec.json_path!r}")
    try:  # malformed or empty files: named with the set's config key
      if spec.kind == "tfds":
        data_dir, _ = build_tfds(spec.json_path, spec.json_path + ".tfds",
                                 spec.image_folder or None)
        return TfdsSource(data_dir)
      return LlavaJsonSource(spec.json_path, spec.image_folder or None, "raise")
    except ValueError as e:
      raise EvalSetError(f"config key '{key}': {e}") from e
  raise EvalSetError(f"config key '{key}.kind': {spec.kind!r} is not one of {KINDS}")


def offline_image_size(model_config, preparer) -> int:
  """Side in pixels of the images offline sets render: the vision tower's input size; for
  Qwen2-VL / 2.5-VL (any image size) 224 px, within the image processor's pixel budget and a
  multiple of its patch factor (patch size x merge size)."""
  spec = getattr(preparer, "qwen_spec", None)
  if spec is None:
    return int(model_config.vision.image_size)
  f = spec.factor
  side = min(max(224, math.isqrt(spec.min_pixels)), math.isqrt(spec.max_pixels))
  return max(f, side // f * f)


def build_sets(eval_cfg, preparer, image_size: int) -> list[EvalSet]:
  """`eval.target.<name>` and `eval.retention.<name>` set configs -> prepared sets."""
  sets = []
  for role in ROLES:
    for name, spec in (eval_cfg.get(role) or {}).items():
      key = f"eval.{role}.{name}"
      if spec.metric not in METRICS:
        raise EvalSetError(f"config key '{key}.metric': {spec.metric!r} is not one of {METRICS}")
      source = _source(spec, key, image_size)
      if len(source) == 0:
        raise EvalSetError(f"config key '{key}': the set is empty")
      try:
        arr = arrays_lib.prepare(source, preparer, spec.num or None, name=name)
      except ValueError as e:
        raise EvalSetError(f"config key '{key}': {e}") from e
      sets.append(EvalSet(name, role, arr, spec.metric))
  return sets


def token_divergence(logits_BTV: jax.Array, base_BTV: jax.Array | None, batch: dict,
                     tokens: str = "supervised") -> dict:
  """Sums over positions t (predicting token t+1) of the tuned model's NLL and top-1 hits on the
  answer tokens and, with base logits, of KL(p_θ0 ‖ p_θ) and top-1 agreement over the `tokens`
  positions. `batch["row_valid"]` (B,), if present, zeroes padding rows."""
  ids = batch["input_ids"]
  valid = batch.get("row_valid", jnp.ones(ids.shape[:1]))[:, None].astype(jnp.float32)
  lm = batch["loss_mask"][:, 1:].astype(jnp.float32) * valid
  lp = jax.nn.log_softmax(logits_BTV[:, :-1].astype(jnp.float32), axis=-1)
  top = jnp.argmax(lp, axis=-1)
  nll = -token_logprobs(logits_BTV[:, :-1], ids[:, 1:])  # XLA shares the log-softmax with lp
  out = {"nll": (nll * lm).sum(), "tokens": lm.sum(), "correct": ((top == ids[:, 1:]) * lm).sum()}
  if base_BTV is None:
    return out
  am = batch["attention_mask"].astype(jnp.float32)
  w = lm if tokens == "supervised" else am[:, 1:] * am[:, :-1] * valid
  lq = jax.nn.log_softmax(base_BTV[:, :-1].astype(jnp.float32), axis=-1)
  kl = token_kl(lq, lp)
  out.update(kl=(kl * w).sum(), agree=((top == jnp.argmax(lq, axis=-1)) * w).sum(),
             positions=w.sum())
  return out


def _divergence_step(model, tokens: str, variables: dict, base_variables: dict | None,
                     batch: dict):
  """One jitted pass: the tuned model's and θ0's logits on the same batch."""
  kw = model_kwargs(batch)
  logits = model.apply(variables, batch["input_ids"], **kw)
  base = None if base_variables is None else model.apply(base_variables, batch["input_ids"], **kw)
  return token_divergence(logits, base, batch, tokens)


class Evaluator:
  """Scores variables on every set: `evaluator(variables, base_variables) -> {key: value}`.

  `put`: host batch -> device arrays (the trainer's sharded `put_batch`); batches have a fixed
  size (the last one repeats a row with zero weight), so each set compiles once."""

  def __init__(self, model, sets: list[EvalSet], tokenizer, image_spec, *, batch_size: int = 64,
               max_new_tokens: int = 8, kl_tokens: str = "supervised",
               put: Callable[[dict], dict] | None = None):
    if kl_tokens not in ("supervised", "all"):
      raise EvalSetError(f"config key 'eval.kl_tokens': {kl_tokens!r} is not supervised | all")
    self.model, self.sets, self.tokenizer, self.spec = model, sets, tokenizer, image_spec
    self.batch_size, self.max_new_tokens = int(batch_size), int(max_new_tokens)
    self.put = put or (lambda b: b)
    self._div = jax.jit(functools.partial(_divergence_step, model, kl_tokens))
    self.eos = _eos_id(tokenizer)

  @property
  def target(self) -> list[str]:
    return [s.name for s in self.sets if s.role == "target"]

  @property
  def retention(self) -> list[str]:
    return [s.name for s in self.sets if s.role == "retention"]

  def divergence(self, variables: dict, base_variables: dict | None, s: EvalSet) -> dict:
    """Teacher-forced loss / token_acc of `variables` on the set and, given θ0, kl / agree."""
    tot: dict[str, float] = {}
    n = len(s.arrays)
    for start in range(0, n, self.batch_size):
      idx = np.arange(start, min(start + self.batch_size, n))
      real = len(idx)
      idx = np.concatenate([idx, np.full(self.batch_size - real, idx[0])])
      b = s.arrays.batch(idx, self.spec)
      b["row_valid"] = (np.arange(self.batch_size) < real).astype(np.float32)
      r = jax.device_get(self._div(variables, base_variables, self.put(b)))
      tot = {k: tot.get(k, 0.0) + float(v) for k, v in r.items()}
    out = {"loss": tot["nll"] / max(tot["tokens"], 1.0),
           "token_acc": 100.0 * tot["correct"] / max(tot["tokens"], 1.0)}
    if base_variables is not None:
      out["kl"] = tot["kl"] / max(tot["positions"], 1.0)
      out["agree"] = tot["agree"] / max(tot["positions"], 1.0)
    return out

  def task_scores(self, variables: dict, s: EvalSet) -> dict[str, float]:
    preds = bench_eval.predict(self.model, variables["params"], variables.get("adapters") or None,
                               s.arrays, self.spec, self.tokenizer, batch_size=self.batch_size,
                               max_new_tokens=self.max_new_tokens, eos_token_id=self.eos)
    return bench_eval.score(preds, s.arrays)

  def __call__(self, variables: dict, base_variables: dict | None = None) -> dict[str, float]:
    """Task score of every set; the teacher-forced pass (loss, token_acc and, with
    `base_variables`, kl / agree) on retention sets and on `token`-metric target sets."""
    out = {}
    for s in self.sets:
      if s.role == "retention" or s.metric == "token":
        div = self.divergence(variables, base_variables if s.role == "retention" else None, s)
        out.update({f"{s.key}/{k}": v for k, v in div.items()})
      if s.metric == "token":
        out[s.key] = div["token_acc"]
        continue
      fam = self.task_scores(variables, s)
      families = sorted(k for k in fam if k != "all")
      out[s.key] = float(np.mean([fam[f] for f in families]))
      if len(families) > 1:
        out.update({f"{s.key}/{f}": fam[f] for f in families})
    return out


def _eos_id(tokenizer) -> int:
  tid = tokenizer.convert_tokens_to_ids("<|im_end|>")
  if isinstance(tid, int) and tid != getattr(tokenizer, "unk_token_id", None) and tid >= 0:
    return tid
  if tokenizer.eos_token_id is None:
    raise EvalSetError("the tokenizer has neither <|im_end|> nor an eos token to stop "
                       "generation at")
  return int(tokenizer.eos_token_id)


def base_anchor(method, variables: dict, mask: dict, base_params: dict) -> dict:
  """{"params/...": θ0 copy} of the base leaves the run changes (trained or rewritten at init,
  e.g. PiSSA's residual): with the frozen partition they give θ0 (`penalties.theta0_variables`)."""
  from mllm_tune import pytree
  flat_base = pytree.flatten(base_params)
  flat_var = pytree.flatten(variables["params"])
  flat_mask = pytree.flatten(mask.get("params", {}))
  keep = {p for p, m in flat_mask.items() if pytree.mask_any(m)}
  keep |= {p for p, x in flat_var.items() if x is not flat_base.get(p)}
  return {"params/" + p: jnp.array(flat_base[p], copy=True) for p in sorted(keep)}


def theta0(frozen: dict, anchor: dict) -> dict:
  from mllm_tune.penalties import theta0_variables
  return theta0_variables(frozen, {"anchor": anchor})
