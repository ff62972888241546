"""Forgetting-penalty presets: `c.penalty = penalties.ewc.get_config()` in an experiment, or
`--config.penalty.name=ewc --config.penalty.weight=1e3` on the command line (METHODS.md 5)."""
