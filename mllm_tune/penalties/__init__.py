"""Penalties against forgetting, composable with any tuning method (`penalties.get(name, ...)`).

    api.py        Penalty contract, registry, config parsing, `bind` -> BoundPenalty
    terms.py      the quadratic pull (distillation terms: mllm_tune/losses/distill.py)
    quadratic.py  ewc, online_ewc, mas, l2sp
    distill.py    lwf, kl
    combined.py   several penalties in one run ("ewc+lwf"); `from_config` and `bind` for all
    gift/         GIFT's losses and its trainer penalty `gift`

The registry holds the `@register`ed classes of PENALTY_MODULES and nothing else.
"""
from mllm_tune.penalties import api, combined, distill, quadratic, terms
from mllm_tune.penalties.api import (CHOICES, REGISTRY, BoundPenalty, Penalty, PenaltyError,
                                     get, penalisable, register, theta0_variables)
from mllm_tune.penalties.combined import (BoundCombination, Combination, bind, from_config,
                                          importance_source)
from mllm_tune.penalties.distill import LwF, TokenKL
from mllm_tune.penalties.gift import penalty as gift_penalty
from mllm_tune.penalties.quadratic import EWC, MAS, L2SP, OnlineEWC

PENALTY_MODULES = (api, quadratic, distill, gift_penalty)
for _module in PENALTY_MODULES:
  api.register_module(_module)
