"""GIFT (docs/methods.md §5.3, arXiv 2503.04229) in the trainer, on any tuning method: per step a
synthetic image-caption batch, prepared like the training data (same tokenizer, template and
image processor), gives g_aux = grad(kd_weight L_KD + ita_weight L_ITA) (L_KD: token KL to the
frozen base at temperature T with T^2; L_ITA: caption NLL), F = g_aux^2 / mean per tensor, and
L_AWC = weight * sum F (theta - theta_ref)^2 (theta_ref: the trainable leaves at the start).
The single source of GIFT's hyperparameters: configs/methods/gift.py (the released CLIP setting)
reads them from here. Needs an HF LLaVA model (model.source=hf): its tokenizer and processor."""
from mllm_tune.configs import base


def get_config():
  c = base.get_config().penalty
  c.name = "gift"
  c.weight = 1.0        # lambda of L_AWC (the code's `l2`)
  c.temperature = 2.0
  c.kd_weight = 1.0
  c.ita_weight = 0.25
  c.static_awc = 0      # K > 0: F = running mean of the first K steps, then frozen (ablation)
  c.synthetic.kind = "procedural"  # procedural | directory
  c.synthetic.path = ""            # kind=directory: holds captions.jsonl (+ the images)
  c.synthetic.num = 1000           # the paper generates 1000 images per dataset
  c.synthetic.seed = 0
  c.synthetic.image_size = 32
  return c
