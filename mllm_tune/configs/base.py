"""Base training config; experiments start from `get_config()` and override fields.

Every field here is type-locked: `--config.train.steps=abc` or an unknown key is an error."""
import ml_collections

from mllm_tune.train.config_io import eval_set  # noqa: F401  (experiments: base.eval_set(...))


def get_config():
  c = ml_collections.ConfigDict()
  c.run_dir = "runs/default"
  c.seed = 0

  c.model = ml_collections.ConfigDict()
  c.model.source = "tiny"        # hf | native | tiny | bench
  c.model.path = ""              # HF model dir (hf) or `mllm-tune convert` output (native)
  # source=bench: the offline benchmark's pre-trained tiny LLaVA (built and cached on first use)
  # of this bench config ('' = mllm_tune/benchmark/config.py); it is then loaded as source=hf.
  c.model.bench_config = ""
  c.model.dtype = "float32"      # compute dtype (bfloat16 on accelerators)
  c.model.param_dtype = "float32"  # dtype the base is loaded in
  c.model.frozen_dtype = ""      # e.g. bfloat16: frozen base weights stored in it ('' = unchanged)
  c.model.remat_policy = "none"  # none | full | dots_saveable | dots_with_no_batch_dims_saveable
  c.model.attention_impl = "auto"  # auto | lse | xla | cudnn: models/attention.py
  # MoE LLMs with mesh.expert > 1: pairs each expert keeps per dispatch group, as a multiple of
  # the average (GShard's capacity factor, e.g. 1.25; the rest are dropped); 0 = dropless
  c.model.moe_capacity_factor = 0.0
  c.model.tiny = ml_collections.ConfigDict(dict(
      seed=0, vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2,
      num_heads=4, num_kv_heads=2, vision_layers=0, vision_hidden_size=32, image_size=28,
      patch_size=14))

  c.method = ml_collections.ConfigDict({"name": "freeze", "preset": "full"})  # full FT

  # decay_on: hf_trainer = weight decay on everything but biases and normalization weights
  # (transformers Trainer's rule) | all (optax's default)
  c.optimizer = ml_collections.ConfigDict(dict(
      name="adamw", learning_rate=1e-4, schedule="cosine", warmup_steps=0, weight_decay=0.0,
      decay_on="hf_trainer", b1=0.9, b2=0.999, eps=1e-8, momentum=0.0, clip_norm=1.0))

  c.train = ml_collections.ConfigDict(dict(
      steps=100, grad_accum=1, log_every=10, eval_every=0, save_every=50, keep=3,
      best_metric="", best_mode="max", nan_guard=True, async_save=True,
      loss_chunk=256,  # positions per chunk of the fused LM head + CE (0: full logits)
      # mixture-of-experts LLMs: weight of the router load-balancing loss (transformers'
      # router_aux_loss_coef, e.g. 0.001; 0 = off, as transformers without output_router_logits)
      router_aux_loss=0.0,
      # a resumed run (run_dir with checkpoints) may change keys that shape the training
      # (model, method, optimizer, data, penalty, seed); off: such changes are refused
      allow_config_change=False,
      prepare_batches=4))  # batches data-derived masks (grad_topk) are computed from

  # forgetting penalty, composable with any method (configs/penalties/*.py, docs/methods.md §5):
  # name: none | ewc | online_ewc | l2sp | mas | lwf | kl | gift. weight: lambda (ewc, online_ewc,
  # mas: required), alpha (l2sp, 0.1), lambda_o (lwf, 1), beta (kl, required), lambda of L_AWC
  # (gift, 1); None = the default. Several at once: name="ewc+lwf", each member's weight in
  # weights.<name> (weight is then refused as ambiguous); at most one of ewc / online_ewc / mas
  # and one of lwf / kl; none and gift stand alone.
  # Importance (ewc/online_ewc/mas): loaded from fisher_path if it exists, else computed on
  # theta0 from fisher_samples samples of fisher_data (train | synthetic | llava_json | tfds,
  # with fisher_json_path / fisher_image_folder) and saved there ('' = run_dir/importance/<kind>,
  # 'auto' = <model.path>/importance/<kind>). fisher_chunk: samples per vmap'ed chunk (memory:
  # that many gradient copies of the penalised leaves; raise it for small models). With several
  # processes each takes ceil(fisher_samples / processes) samples of its own data shard.
  # online_ewc: F~ = gamma F~_prev (prev_fisher_path) + F; refresh_every K > 0 repeats that
  # every K steps within the run (F at the current weights, anchor = the current weights).
  c.penalty = ml_collections.ConfigDict(dict(
      name="none", weight=ml_collections.FieldReference(None, field_type=float),
      fisher_kind="empirical", fisher_path="", fisher_data="train", fisher_json_path="",
      fisher_image_folder="", fisher_samples=512, fisher_chunk=1, fisher_seed=0,
      prev_fisher_path="", gamma=1.0, refresh_every=0, beta=0.01,
      temperature=ml_collections.FieldReference(None, field_type=float),  # lwf 2, kl 1
      t2_scale=ml_collections.FieldReference(None, field_type=bool),      # lwf False, kl True
      direction="forward", tokens="supervised",
      # gift (configs/penalties/gift.py): KD / caption-NLL weights (None: 1 / 0.25), static_awc
      kd_weight=ml_collections.FieldReference(None, field_type=float),
      ita_weight=ml_collections.FieldReference(None, field_type=float), static_awc=0,
      weights=ml_collections.ConfigDict(
          {n: ml_collections.FieldReference(None, field_type=float)
           for n in ("ewc", "online_ewc", "mas", "l2sp", "lwf", "kl")})))
  # gift's synthetic image-caption pairs, one batch per step: kind procedural | directory (path
  # holding captions.jsonl); num / seed / image_size: the procedural source; batch_size and
  # seq_len 0 = data.batch_size / data.seq_len; prompt: the human turn after "<image>\n".
  c.penalty.synthetic = ml_collections.ConfigDict(dict(
      kind="procedural", path="", num=1000, seed=0, image_size=32, batch_size=0, seq_len=0,
      prompt="Describe the image briefly."))

  # data x fsdp x expert x tensor devices (one may be -1); the batch rows split over data, fsdp
  # and expert; expert > 1 splits the mixture-of-experts stacks by expert (expert parallelism).
  # devices: 0 = all devices; N = the first N (e.g. a 1-device reference run)
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1, expert=1, devices=0))

  # Every train.eval_every steps (and at step 0, the reference): held-out loss, token accuracy
  # and perplexity of `kind` (num_batches batches), and both sides of the trade-off: the target
  # sets `eval.target.<name>` and the retention sets `eval.retention.<name>` (build each with
  # `eval_set(...)` in an experiment config, or on the command line field by field:
  # --config.eval.target.NAME.kind=llava_json --config.eval.target.NAME.json_path=...),
  # scored by greedy generation + VQA accuracy
  # (metric vqa) or teacher-forced token accuracy (token), plus the KL from the frozen base θ0
  # over `kl_tokens` (supervised | all) positions; trade-off scores E, F, O, H and
  # weights[0]·E + weights[1]·F against θ0 (mllm_tune/eval/selection.py).
  c.eval = ml_collections.ConfigDict(dict(
      kind="", json_path="", image_folder="", num_batches=4, batch_size=64, max_new_tokens=8,
      kl_tokens="supervised", weights=(1.0, 1.0), report=True))
  c.eval.target = ml_collections.ConfigDict()
  c.eval.retention = ml_collections.ConfigDict()

  # post-hoc step after training (a recipe; mllm_tune/train/posthoc_step.py): none | wise_ft |
  # dare | ties; `sweep` lists the candidate alpha (wise_ft) / p (dare) / k (ties) values, the
  # one best by train.best_metric (default tradeoff/O) on the eval sets is kept.
  c.posthoc = ml_collections.ConfigDict(dict(
      name="none", sweep=(), alpha=0.5, alphas=(), p=0.9, rescale=True, k=0.2, lam=1.0,
      scope="global", seed=0))

  c.data = ml_collections.ConfigDict()
  c.data.kind = "synthetic"      # synthetic | llava_json | tfds | offline (configs/data/)
  c.data.batch_size = 8
  c.data.seq_len = 64
  c.data.seed = 0
  return c
