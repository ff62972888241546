"""Additive tuning (METHODS.md 3): methods that add parameters beside the frozen base.

Importing this module registers them all (and their PEFT export/import):

| name               | module                 | adapter leaves (hook that applies them)        |
|--------------------|------------------------|------------------------------------------------|
| `adapter`          | additive_adapters.py   | `bottleneck_*` beside a Linear (layers.Linear)  |
| `parallel_adapter` | additive_adapters.py   | `parallel_*` in an FFN (layers.parallel_adapter)|
| `ia3`              | additive_ia3.py        | `ia3_in` / `ia3_out` (layers.Linear)            |
| `prompt_tuning`    | additive_prompts.py    | `llm/prompt_embeddings` (llm.LLM)               |
| `prefix_tuning`    | additive_prompts.py    | `llm/prefix_{k,v}` or `llm/prefix_mlp_*` (llm.LLM)|
| `llama_adapter`    | additive_prompts.py    | `adaption_prompt`, `adaption_gate` (llm.Attention)|
| `vpt`              | additive_vpt.py        | `vision/{deep_,}prompt_tokens` (vision.VisionTower)|

Only `ia3` merges into the base weights; the others raise on `merge` (export their adapters).
"""
from mllm_tune.tuning import additive_adapters, additive_ia3, additive_peft  # noqa: F401
from mllm_tune.tuning import additive_prompts, additive_vpt  # noqa: F401
from mllm_tune.tuning.additive_adapters import BottleneckAdapter, ParallelAdapter
from mllm_tune.tuning.additive_ia3 import IA3
from mllm_tune.tuning.additive_prompts import (LlamaAdapter, PrefixTuning, PromptTuning,
                                               materialize)
from mllm_tune.tuning.additive_vpt import VPT

__all__ = ["BottleneckAdapter", "ParallelAdapter", "IA3", "PromptTuning", "PrefixTuning",
           "LlamaAdapter", "VPT", "materialize"]
