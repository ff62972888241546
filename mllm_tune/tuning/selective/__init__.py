"""Selective tuning (docs/methods.md §2): `by_path.py` (freeze, bitfit, ln_tuning), `hft.py`,
`spider.py`, `grad_topk.py`, `model_tailor.py`; shared mask helpers are in `tuning/masks.py`."""
