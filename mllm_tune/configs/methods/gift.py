"""GIFT (docs/methods.md §5.3, arXiv 2503.04229; released MTIL setting, configs/mtil_order_I.json)
for the CLIP step (`penalties.gift.make_gift_step`): the shared hyperparameters (T, kd_weight,
ita_weight, awc_weight = the penalty's weight, static_awc, synthetic source) come from
configs/penalties/gift.py, the one source of truth; the CLIP-only ones are here: label smoothing
of L_ITA / L_CE, `frozen` (regexes on leaf paths that neither train nor count in F: the code
freezes logit_scale), AdamW with weight decay 0, lr 1e-5 (5e-5 for some tasks), 1000
iterations per task. In the trainer use `penalty.name=gift` instead."""
import ml_collections

from mllm_tune.configs.penalties import gift as gift_penalty


def get_config():
  p = gift_penalty.get_config()
  c = ml_collections.ConfigDict()
  c.name = "gift"
  c.temperature = p.temperature
  c.kd_weight = p.kd_weight
  c.ita_weight = p.ita_weight
  c.label_smoothing = 0.2
  c.awc_weight = p.weight
  c.static_awc = p.static_awc
  c.frozen = ("logit_scale",)
  c.learning_rate = 1e-5
  c.weight_decay = 0.0
  c.iterations = 1000
  c.synthetic = ml_collections.ConfigDict(
      {k: p.synthetic[k] for k in ("kind", "path", "num", "seed", "image_size")})
  return c
