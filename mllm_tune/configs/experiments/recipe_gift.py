"""GIFT-style consolidation (docs/methods.md §5.3) on the offline benchmark: full fine-tuning with
GIFT's contrastive distillation from the frozen base on synthetic image-caption pairs and its
adaptive weight consolidation (AWC), then WiSE-FT at the alpha best by O = E + F."""
from mllm_tune.configs.experiments import offline_recipe


def get_config():
  c = offline_recipe.get_config(
      "full", penalty=dict(name="gift"),
      posthoc=dict(name="wise_ft", sweep=(0.5, 0.75, 1.0)))
  c.run_dir = "runs/recipe_gift"
  c.penalty.synthetic.image_size = 32
  c.penalty.synthetic.batch_size = 16
  c.penalty.synthetic.seq_len = 128
  return c
