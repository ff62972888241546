"""GIFT (METHODS.md 5.3, arXiv 2503.04229; released MTIL setting, configs/mtil_order_I.json):
contrastive distillation (T, kd_weight) and image-text alignment (ita_weight, label smoothing) on
synthetic pairs, adaptive weight consolidation (awc_weight = the code's `l2`, static_awc = K
freezes a K-iteration running mean of F; 0 recomputes it every iteration). AdamW, weight decay 0,
lr 1e-5 (5e-5 for some tasks), 1000 iterations per task. `frozen`: regexes on leaf paths that
neither train nor count in F (the code freezes logit_scale)."""
import ml_collections
from ml_collections import config_dict


def get_config():
  c = ml_collections.ConfigDict()
  c.name = "gift"
  c.temperature = 2.0
  c.kd_weight = 1.0
  c.ita_weight = 0.25
  c.label_smoothing = 0.2
  c.awc_weight = 1.0
  c.static_awc = 0
  c.frozen = ("logit_scale",)
  c.learning_rate = 1e-5
  c.weight_decay = 0.0
  c.iterations = 1000
  c.synthetic = ml_collections.ConfigDict()
  c.synthetic.kind = "procedural"  # procedural | directory
  c.synthetic.path = config_dict.placeholder(str)  # directory holding captions.jsonl
  c.synthetic.num = 1000  # the paper generates 1000 images per dataset
  c.synthetic.seed = 0
  c.synthetic.image_size = 32
  return c
