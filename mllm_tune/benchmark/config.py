"""The offline specialization-vs-retention benchmark (`mllm-tune bench`, issue 8).

A tiny LLaVA (CLIP-style ViT + Llama-style LLM, BPE tokenizer trained on the fly; `model.family`
picks a OneVision- or Qwen2.5-VL-shaped base instead) is pre-trained once on the general mix
(cached), then each method tunes it on the downstream task and both sides are measured
(docs/methods.md §8). `methods` holds every method the bench knows, each a
`configs/methods/<name>.py`-style config plus its learning rate `lr`; `run` picks which run.
Targets are anchored at `llm/` (docs/methods.md §1.2). Learning rates come from a small sweep on
seed 0 (results/tradeoff.md says which), the same data order and step budget for every method.
"""
import ml_collections

LLM_LINEARS = r"llm/layers_\d+/(attn/(q|k|v|o)_proj|mlp/(gate|up|down)_proj)"
# The tiny tower was pre-trained on shapes and colours only, so the downstream task needs it to
# adapt: LoRA-family methods here wrap every linear layer (LLM, vision tower, projector). Vision
# names: CLIP / SigLIP (q|k|v|out_proj, fc1|2) and Qwen2.5-VL (fused qkv, proj, gated MLP).
ALL_LINEARS = (r"llm/layers_\d+/(attn/(q|k|v|o)_proj|mlp/(gate|up|down)_proj)"
               r"|vision/layers_\d+/(attn/(q|k|v|out)_proj|mlp/fc(1|2)"
               r"|attn/(qkv|proj)|mlp/(gate|up|down)_proj)|projector/linear_(1|2)")
VISION_LINEARS = {"clip": r"attn/(q|k|v|out)_proj|mlp/fc(1|2)",
                  "qwen": r"attn/(qkv|proj)|mlp/(gate|up|down)_proj"}


def all_linears(family: str) -> str:
  """`ALL_LINEARS` with the vision names of `family`'s tower only (CLIP / SigLIP or Qwen2.5-VL):
  what a bench run uses, so the selector matches every alternative it spells."""
  tower = VISION_LINEARS["qwen" if family.startswith("qwen") else "clip"]
  return rf"{LLM_LINEARS}|vision/layers_\d+/({tower})|projector/linear_(1|2)"


def methods() -> dict:
  """Bench method name -> method config (`tuning.from_config`), its learning rate `lr` and an
  optional forgetting `penalty` (`mllm_tune.penalties` config)."""
  lora = dict(rank=8, alpha=16.0, dropout=0.0, targets=ALL_LINEARS)
  return {
      "full": dict(name="freeze", preset="full", lr=1e-3),
      "full+ewc": dict(name="freeze", preset="full", lr=1e-3,
                       penalty=dict(name="ewc", weight=1e4, fisher_samples=256)),
      "full+l2sp": dict(name="freeze", preset="full", lr=1e-3,
                        penalty=dict(name="l2sp", weight=1.0, beta=0.0)),
      "full+lwf": dict(name="freeze", preset="full", lr=1e-3, penalty=dict(name="lwf", weight=1.0)),
      "llm_only": dict(name="freeze", preset="llm", lr=1e-3),
      "lora": dict(name="lora", **lora, lr=3e-3),
      "lora_llm": dict(name="lora", **{**lora, "targets": LLM_LINEARS}, lr=3e-3),
      "rslora": dict(name="rslora", **lora, lr=3e-3),
      "dora": dict(name="dora", **lora, lr=3e-3),
      "pissa": dict(name="pissa", **{**lora, "alpha": 8.0}, lr=3e-3),
      "vera": dict(name="vera", rank=64, targets=ALL_LINEARS, lr=1e-2),
      "lorasculpt": dict(name="lorasculpt", **lora, rho=0.1, t0=30, cmr_lambda=1e-3, lr=3e-3),
      "bitfit": dict(name="bitfit", lr=3e-3),
      "ln_tuning": dict(name="ln_tuning", lr=3e-3),
      "hft": dict(name="hft", lr=1e-3),
      "spider": dict(name="spider", preset="full", lr=1e-3),
      "ia3": dict(name="ia3", lr=1e-2),
      "adapter": dict(name="adapter", bottleneck=16, lr=1e-3),
      "parallel_adapter": dict(name="parallel_adapter", lr=1e-3),
      "prompt_tuning": dict(name="prompt_tuning", lr=3e-2),
  }


def get_config(arg: str | None = None):
  c = ml_collections.ConfigDict()
  c.out_dir = "runs/bench"
  c.cache_dir = ""            # '' = $MLLM_TUNE_CACHE/bench or ~/.cache/mllm_tune/bench
  c.data_seed = 0
  c.general = ("color", "shape", "count", "position")   # upstream sets (one per family)
  c.downstream = "digits"     # digits (sklearn handwritten digits) | letter (rendered letters)
  # family: "llava" (CLIP + Llama, one 32 px crop per image), "llava_onevision" (SigLIP +
  # Qwen2, anyres: a base crop + up to 2 x 2 crops of crop_size (0 = image_size / 2) per image)
  # or "qwen2_5_vl" (Qwen2.5-VL tower, windows of window_size px but full attention in its last
  # block, 2 x 2 patch merger, Qwen2 with M-RoPE: a 32 px image = 8 x 8 patches, 16 tokens)
  c.model = ml_collections.ConfigDict(dict(
      family="llava", crop_size=0, vision_aspect_ratio="anyres_max_4", window_size=16,
      image_size=32, patch_size=4, vision_hidden=96, vision_mlp=192, vision_layers=3,
      vision_heads=3, vision_feature_layer=-1, hidden=128, mlp=256, layers=2, heads=4,
      kv_heads=4, vocab_size=512, max_positions=256))
  c.pretrain = ml_collections.ConfigDict(dict(
      steps=600, batch_size=64, learning_rate=1e-3, warmup_steps=50, num_records=8000, seed=0))
  c.tune = ml_collections.ConfigDict(dict(
      steps=1000, batch_size=32, num_records=2000, warmup_steps=10,
      importance_records=256))  # general-mix samples EWC / MAS importance is computed on
  c.eval = ml_collections.ConfigDict(dict(
      general_per_family=100, downstream=300, batch_size=100, max_new_tokens=4))
  c.methods = ml_collections.ConfigDict(methods())
  c.run = ("full", "full+ewc", "full+l2sp", "lora", "lorasculpt", "spider")
  c.seeds = (0, 1, 2)
  if arg == "tiny":  # tests: a model and pre-training that build in seconds
    c.model.update(dict(image_size=24, patch_size=8, vision_hidden=32, vision_mlp=64,
                        vision_layers=1, vision_heads=2, hidden=32, mlp=64, layers=1, heads=2,
                        kv_heads=1, vocab_size=400))
    c.pretrain.update(dict(steps=3, batch_size=8, num_records=32, warmup_steps=1))
  if arg == "demo":  # `mllm-tune demo`: fewer methods, one seed
    c.out_dir = "runs/demo"
    c.run = ("full", "lora", "spider")
    c.seeds = (0,)
    c.tune.steps = 200
  return c
