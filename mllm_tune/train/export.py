"""A run's trained weights out (`mllm-tune export`): any subset of

  peft    a PEFT adapter directory (adapter_config.json + adapter_model.safetensors) that
          `PeftModel.from_pretrained(base, dir)` loads; for methods PEFT has (tuning/peft/),
          LoRA-family methods composed with whole-module or bias training included
  merged  a Hugging Face model directory with the method folded into the base (`method.merge`)
          and the base checkpoint's tokenizer / processor / chat-template / generation files
          copied beside it (when the base is an HF directory)
  native  our adapter directory (mllm_adapter.json + adapters.safetensors, `tuning/files.py`):
          every method, loadable with `mllm_tune.tuning.files.load_adapters(dir, base_params)`

`export_tailored` writes Model Tailor's patch of a run's fine-tuned weights (docs/methods.md
§2.6: a sparse part of the weight change kept, the rest reset to the base and compensated) as
such a merged HF directory, calibrated on batches the caller gives (the CLI: the run's training
data). `export_posthoc` writes a run's post-hoc model (`RUN_DIR/posthoc/model`: WiSE-FT / DARE /
TIES of the run's last step, already merged into base weights) as such a merged HF directory.

Everything that can be refused (no PEFT counterpart, a method that cannot merge) is computed
before anything is written, so a refused export leaves no partial output.
"""
from __future__ import annotations

import os

from mllm_tune import pytree
from mllm_tune.checkpoints.hf import save_pretrained
from mllm_tune.tuning import files, peft
from mllm_tune.train.runs import RunError, TrainedRun, read_config


def _hf_base(run: TrainedRun) -> str | None:
  """The base's HF directory (source of tokenizer / processor files), if it is one."""
  p = run.base_path
  return p if os.path.isfile(os.path.join(p, "config.json")) else None


def trained_mask(run: TrainedRun) -> dict:
  """Whole-leaf mask of what the checkpoint holds (the native file saves those leaves)."""
  return pytree.unflatten({p: p in run.trained for p in pytree.flatten(run.variables)})


def export_run(run: TrainedRun, peft_dir: str | None = None, merged_dir: str | None = None,
               native_dir: str | None = None, dtype: str | None = None) -> dict[str, str]:
  """Write the requested outputs of `run` -> {"peft" | "merged" | "native": directory}."""
  if not (peft_dir or merged_dir or native_dir):
    raise RunError("nothing to export: give a PEFT, merged and/or native output directory")
  base = _hf_base(run)
  adapter = (peft.peft_adapter(run.model, run.method, run.variables,
                               base_model_name_or_path=base or "") if peft_dir else None)
  merged = run.method.merge(run.variables) if merged_dir else None
  out = {}
  if peft_dir:
    peft.write_adapter(peft_dir, *adapter)
    out["peft"] = peft_dir
  if merged_dir:
    save_pretrained(merged_dir, run.model, merged, dtype=dtype, source_dir=base)
    out["merged"] = merged_dir
  if native_dir:
    files.save_adapters(native_dir, run.method, run.variables, mask=trained_mask(run),
                        base_model=run.base_path)
    out["native"] = native_dir
  return out


def export_posthoc(run_dir: str, merged_dir: str, dtype: str | None = None,
                   base: str | None = None) -> dict:
  """The run's post-hoc model as an HF directory with the base's tokenizer / processor files
  (`base`, default the run's model.path) -> {"merged": dir, "from_step": N, <param>: value}.
  Refused when the run has no post-hoc record, or when its newest checkpoint is not the step
  the post-hoc step was applied to (a run resumed for more steps since)."""
  import json
  from mllm_tune.checkpoints.native import load_native
  from mllm_tune.train.runs import checkpointer
  record_path = os.path.join(run_dir, "posthoc.json")
  model_dir = os.path.join(run_dir, "posthoc", "model")
  if not (os.path.isfile(record_path) and os.path.isdir(model_dir)):
    raise RunError(f"{run_dir}: no post-hoc model (posthoc.json, posthoc/model): the run had no "
                   "post-hoc step (posthoc.name) or did not finish")
  with open(record_path) as f:
    record = json.load(f)
  cfg = read_config(run_dir)
  latest = checkpointer(run_dir, cfg).latest_step()
  if latest is not None and latest != record.get("from_step"):
    raise RunError(f"{run_dir}: the post-hoc model is of step {record.get('from_step')}, but the "
                   f"run's newest checkpoint is step {latest} (resumed since?): it is stale")
  base = os.path.abspath(base) if base else cfg.model.path
  if not os.path.isdir(base):
    raise RunError(f"{run_dir}: the run's base model.path={base!r} is not a directory "
                   "(relative to where training ran?); give the base explicitly (--base)")
  model, params = load_native(model_dir)
  source = base if os.path.isfile(os.path.join(base, "config.json")) else None
  save_pretrained(merged_dir, model, params, dtype=dtype, source_dir=source)
  return {"merged": merged_dir, "from_step": record.get("from_step"),
          record.get("param", "value"): record.get("chosen")}


def export_tailored(run: TrainedRun, merged_dir: str, theta0: dict, batches, options=None,
                    dtype: str | None = None) -> dict:
  """Model Tailor (`tuning.get("model_tailor", **options)`) on the run's weights:
  theta_ft = `run.method.merge(run.variables)`, `theta0` the base params, calibration `batches`
  (model inputs, e.g. training batches); the tailored params are written as an HF directory
  with the base's tokenizer / processor files -> {"merged": dir, "tailored_layers": [...],
  "calibration_batches": n, <options>}. Refused (before writing) when the method does not
  merge into base weights or the run changed no LLM block."""
  from mllm_tune import tuning
  from mllm_tune.tuning.selective.model_tailor import changed_layers
  tailor = tuning.get("model_tailor", **dict(options or {}))
  try:
    theta_ft = run.method.merge(run.variables)
  except tuning.MethodError as e:
    raise RunError(f"--tailor works on fine-tuned base weights, and method "
                   f"'{tuning.api.label(run.method)}' does not merge into them: {e}") from e
  layers = sorted(tailor.layers if tailor.layers is not None
                  else changed_layers(theta0, theta_ft))
  if not layers:
    raise RunError(f"--tailor: step {run.step} of the run changes no LLM block, so Model Tailor "
                   "has nothing to tailor (it patches the LLM blocks' Linear kernels)")
  batches = list(batches)
  params = tailor.tailor(run.model, theta0, theta_ft, batches)
  save_pretrained(merged_dir, run.model, params, dtype=dtype, source_dir=_hf_base(run))
  fields = ("sparsity", "block_size", "damp", "salience_weight", "sensitivity_weight",
            "compensation_sign", "compensate", "reset_projector")
  return {"merged": merged_dir, "tailored_layers": [int(i) for i in layers],
          "calibration_batches": len(batches), **{k: getattr(tailor, k) for k in fields}}

