"""Reparameterization (docs/methods.md §1): `lora.py` (lora, rslora, dora, pissa), `vera.py`,
`lorasculpt.py`; their PEFT mappings are in `tuning/peft/`."""
