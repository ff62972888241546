"""mllm_tune: tune multimodal LLMs in JAX/Flax without forgetting.

    import mllm_tune as mt
    model, params = mt.load_pretrained("path/to/hf_dir")
    logits = model.apply({"params": params}, input_ids=ids_BL, attention_mask=mask_BL,
                         pixel_values=px_NHWC)
    mt.save_pretrained("out_dir", model, params)
    new_BT = mt.generate(model, params, input_ids=ids_BL, attention_mask=mask_BL,
                         pixel_values=px_NHWC, max_new_tokens=20)
    kw = mt.hf_inputs(model, processor(images=..., text=..., return_tensors="np"))
    logits = model.apply({"params": params}, **kw)   # any family, HF processor output
    run = mt.load_run("runs/my_run", step="best")   # a training run's trained variables
    logits = run.model.apply(run.variables, input_ids=ids_BL, attention_mask=mask_BL)
"""
from mllm_tune.checkpoints.hf import load_pretrained, save_pretrained
from mllm_tune.eval.generate import generate
from mllm_tune.models import build_model, init_params
from mllm_tune.models.hf_inputs import hf_inputs
from mllm_tune import tuning

__version__ = "0.1.0"


def load_run(run_dir: str, step: int | str | None = None, base: str | None = None):
  """A training run's trained variables without its data pipeline or optimizer state:
  `step` None (the latest checkpoint), N, or "best" (the run's selection); `base` overrides the
  run's base model directory. -> `mllm_tune.train.runs.TrainedRun` (model, variables, method,
  config, step, base_path, trained). Imported on first use (the trainer's modules are heavy)."""
  from mllm_tune.train.runs import load_run as _load_run
  return _load_run(run_dir, step=step, base=base)


__all__ = ["load_pretrained", "save_pretrained", "generate", "build_model", "init_params",
           "hf_inputs", "load_run"]
