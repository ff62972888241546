"""Logit calibration (docs/methods.md §6.4, Mai et al. NeurIPS 2024): add gamma to the logits of
classes (closed-set answers) absent from tuning; gamma by ALG on the tuning train split unless set.
`open_ended_first_token`: the step-1 bias heuristic for open-ended VQA (reported separately).
Consumed by `mllm_tune.posthoc.calibration` (`alg_gamma`, `calibrate`, `first_token_bias`)."""
import ml_collections
from ml_collections import config_dict


def get_config():
  c = ml_collections.ConfigDict()
  c.name = "calibration"
  c.gamma = config_dict.placeholder(float)  # None: estimate by ALG
  c.estimator = "alg"
  c.open_ended_first_token = False
  return c
