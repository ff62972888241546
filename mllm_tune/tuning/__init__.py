"""Tuning methods behind one API: `mt.tuning.get(name, **cfg)` (see api.py for the contract).

    api.py      Method contract, registry, Compose, partition, optimizer chain, trainable table
    masks.py    mask helpers shared by the families (rules -> masks, layer counts, target regexes)
    files.py    native adapter files (mllm_adapter.json + adapters.safetensors)
    reparam/    lora (lora, rslora, dora, pissa), vera, lorasculpt
    selective/  by_path (freeze, bitfit, ln_tuning), hft, spider, grad_topk, model_tailor,
                tokens (trainable_tokens)
    additive/   bottleneck (adapter, parallel_adapter), ia3, prompts (prompt_tuning,
                prefix_tuning, llama_adapter), vpt
    peft/       PEFT export / import and the per-method tensor mappings

Forgetting penalties, importance scores and post-hoc merging are the sibling packages
`mllm_tune.penalties`, `mllm_tune.importance` and `mllm_tune.posthoc`.
"""
from mllm_tune.tuning import api, files, masks, peft
from mllm_tune.tuning.additive import bottleneck, ia3, prompts, vpt
from mllm_tune.tuning.api import (Compose, Method, MethodError, build_optimizer, combine, compose,
                                  from_config, get, log_trainable, names, partition,
                                  trainable_table)
from mllm_tune.tuning.reparam import lora, lorasculpt, vera
from mllm_tune.tuning.selective import by_path, grad_topk, hft, model_tailor, spider, tokens

# The one list of method modules: the registry holds the `@register`ed classes of these, and
# nothing else registers a method.
METHOD_MODULES = (lora, lorasculpt, vera,                               # reparameterization
                  by_path, hft, spider, grad_topk, model_tailor, tokens,  # selective
                  bottleneck, ia3, prompts, vpt)                        # additive
for _module in METHOD_MODULES:
  api.register_module(_module)

__all__ = ["api", "masks", "files", "peft", "Compose", "Method", "MethodError", "build_optimizer",
           "combine", "compose", "from_config", "get", "log_trainable", "names", "partition",
           "trainable_table", "METHOD_MODULES"]
