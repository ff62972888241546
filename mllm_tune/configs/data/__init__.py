"""Data pipeline configs (`get_config()` -> the `data` section of an experiment)."""
