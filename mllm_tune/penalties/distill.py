"""Distillation from the frozen base: LwF and token KL (docs/methods.md §5.4, 5.7); the terms are
`terms.lwf_sum` / `terms.kl_sum`, applied by `api.BoundPenalty`."""
from __future__ import annotations

import dataclasses
from typing import ClassVar

from mllm_tune.penalties.api import Penalty, register


@register("lwf")
@dataclasses.dataclass(frozen=True)
class LwF(Penalty):
  """LwF (Li & Hoiem 2016): weight = lambda_o (1), T = 2, no T^2 (`t2_scale=False`)."""
  family: ClassVar[str] = "distill"
  default_weight: ClassVar[float | None] = 1.0
  temperature: float = 2.0
  t2_scale: bool = False
  tokens: str = "supervised"


@register("kl")
@dataclasses.dataclass(frozen=True)
class TokenKL(LwF):
  """Token-level KL to the frozen base [choice]: weight = beta, T = 1 (T^2 when t2_scale)."""
  default_weight: ClassVar[float | None] = None
  temperature: float = 1.0
  t2_scale: bool = True
  direction: str = "forward"
