"""Forgetting-penalty presets: `c.penalty = penalties.ewc.get_config()` in an experiment, or
`--config.penalty.name=ewc --config.penalty.weight=1e3` on the command line (docs/methods.md §5)."""
