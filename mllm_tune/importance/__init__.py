"""Which weights matter, for penalties (EWC, MAS) and selective methods alike.

`fisher.py`: the per-example gradient engine, empirical / true Fisher and MAS scores on LM
batches, online EWC update; `store.py`: importance files checked against the model and base;
`magnitude.py`: magnitude-based scores (SPIDER's psi(|X|), LoRASculpt's CMR weight).
"""
