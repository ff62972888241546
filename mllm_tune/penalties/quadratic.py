"""Quadratic pulls toward the base theta0: EWC, online EWC, MAS, L2-SP (docs/methods.md §5.1, 5.2,
5.5, 5.6); the term itself is `terms.quadratic`, applied by `api.BoundPenalty`."""
from __future__ import annotations

import dataclasses
from typing import ClassVar

from mllm_tune.penalties.api import Penalty, PenaltyError, register


@register("ewc")
@dataclasses.dataclass(frozen=True)
class EWC(Penalty):
  """EWC (Kirkpatrick et al. 2017): (lambda/2) sum F (w - theta*)^2; `fisher_kind` empirical
  (ground-truth labels) | true (sampled labels, docs/methods.md §5.1)."""
  family: ClassVar[str] = "quadratic"
  importance: ClassVar[str | None] = "fisher"
  default_weight: ClassVar[float | None] = None
  factor: ClassVar[float] = 0.5
  fisher_kind: str = "empirical"


@register("online_ewc")
@dataclasses.dataclass(frozen=True)
class OnlineEWC(EWC):
  """Online EWC (Schwarz et al. 2018): EWC with F~ = gamma F~_prev + F, theta* = this base;
  `refresh_every` K > 0 repeats the update within the run every K steps (F at the current
  weights, theta* = the current weights; train/penalty_refresh.py)."""
  gamma: float = 1.0
  refresh_every: int = 0

  def __post_init__(self):
    super().__post_init__()
    if int(self.refresh_every) != self.refresh_every or self.refresh_every < 0:
      raise PenaltyError(f"penalty.refresh_every must be an integer >= 0 (0: off), got "
                         f"{self.refresh_every}")


@register("mas")
@dataclasses.dataclass(frozen=True)
class MAS(Penalty):
  """MAS (Aljundi et al. 2018): lambda sum Omega (w - theta*)^2 (no 1/2)."""
  family: ClassVar[str] = "quadratic"
  importance: ClassVar[str | None] = "mas"
  default_weight: ClassVar[float | None] = None
  factor: ClassVar[float] = 1.0


@register("l2sp")
@dataclasses.dataclass(frozen=True)
class L2SP(Penalty):
  """L2-SP (Li et al. 2018): weight = alpha (0.1) on S, `beta` (0.01) on Sbar [paper, re-tune]."""
  family: ClassVar[str] = "quadratic"
  default_weight: ClassVar[float | None] = 0.1
  factor: ClassVar[float] = 0.5
  beta: float = 0.01
