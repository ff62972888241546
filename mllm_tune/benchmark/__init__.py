"""The offline specialization-vs-retention benchmark (issue 8) and the demo built on it.

    base = pretrain.ensure_base(cfg)            # tiny LLaVA pre-trained on the general mix (cached)
    runs = runner.run_bench(cfg, methods, seeds) # tune, evaluate both sides, one RunRecord each

`mllm-tune demo` and `mllm-tune bench` are thin wrappers (see `runner`).
"""
