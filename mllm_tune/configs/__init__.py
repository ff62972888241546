"""The shipped training configs (ml_collections): `base.py`, `methods/`, `penalties/`, `data/`,
`models/`, `experiments/`. Config files anywhere import them as `mllm_tune.configs...` or, under
`mllm-tune train` / `load_config`, as `configs...` (the repository's `configs/` holds thin
copies, and outside a clone `configs` is these files). `mllm-tune train --config
configs/experiments/X.py` reads this package's file when the working directory has no such file.
"""
