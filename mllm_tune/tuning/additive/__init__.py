"""Additive tuning (docs/methods.md §3): methods that add parameters beside the frozen base.

Registered by `tuning/__init__.py` (METHOD_MODULES); PEFT mappings are in `tuning/peft/additive.py`.

| name               | module                 | adapter leaves (hook that applies them)        |
|--------------------|------------------------|------------------------------------------------|
| `adapter`          | bottleneck.py          | `bottleneck_*` beside a Linear (layers.Linear)  |
| `parallel_adapter` | bottleneck.py          | `parallel_*` in an FFN (adapters.parallel_adapter)|
| `ia3`              | ia3.py                 | `ia3_in` / `ia3_out` (layers.Linear)            |
| `prompt_tuning`    | prompts.py             | `llm/prompt_embeddings` (llm.LLM)               |
| `prefix_tuning`    | prompts.py             | `llm/prefix_{k,v}` or `llm/prefix_mlp_*` (llm.LLM)|
| `llama_adapter`    | prompts.py             | `adaption_prompt`, `adaption_gate` (llm.Attention)|
| `vpt`              | vpt.py                 | `vision/{deep_,}prompt_tokens` (vision.VisionTower)|

Only `ia3` merges into the base weights; the others raise on `merge` (export their adapters).
"""
from mllm_tune.tuning.additive.bottleneck import BottleneckAdapter, ParallelAdapter
from mllm_tune.tuning.additive.ia3 import IA3
from mllm_tune.tuning.additive.prompts import (LlamaAdapter, PrefixTuning, PromptTuning,
                                               materialize)
from mllm_tune.tuning.additive.vpt import VPT

__all__ = ["BottleneckAdapter", "ParallelAdapter", "IA3", "PromptTuning", "PrefixTuning",
           "LlamaAdapter", "VPT", "materialize"]
