"""Test helpers (no tests here): test modules import these, never each other.

- `hf_tiny`     tiny random transformers models (the PyTorch references) and batches for them
- `peft_ref`    a tiny LLaVA in both worlds (ours and transformers) and one loss, for peft parity
- `tiny_models` our own tiny Llama / LLaVA (random params from shapes), losses, a jitted train loop
                and the masking assertions of the selective-method tests
- `data`        local tokenizers (trained in-process), images and LLaVA-format records
- `train`       tiny trainer configs, `mllm-tune` subprocess runs, metrics.jsonl losses
- `configs`     the shipped config modules of a folder, loaded from the package and the thin copy
- `method_steps` every method / penalty / merge on one packed anyres or Qwen batch (shared checks)
- `hf_parity`   safetensors, PEFT LoRA both ways and per-record comparisons against transformers

`ROOT` is the repository root (tests that run scripts or subprocesses use it as cwd).
"""
import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
