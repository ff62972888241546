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
"""
from mllm_tune.checkpoints.hf import load_pretrained, save_pretrained
from mllm_tune.eval.generate import generate
from mllm_tune.models import build_model, init_params
from mllm_tune.models.hf_inputs import hf_inputs
from mllm_tune import tuning

__version__ = "0.1.0"
__all__ = ["load_pretrained", "save_pretrained", "generate", "build_model", "init_params",
           "hf_inputs"]
