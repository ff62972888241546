"""GIFT (docs/methods.md §5.3): `losses.py` holds the math (KD, ITA, AWC importance and penalty, the
CLIP two-pass step), `penalty.py` the trainer penalty `gift` (`Gift`, `BoundGift`)."""
from mllm_tune.penalties.gift import losses, penalty
from mllm_tune.penalties.gift.losses import *  # noqa: F401,F403
from mllm_tune.penalties.gift.penalty import BoundGift, Gift, GiftState  # noqa: F401
