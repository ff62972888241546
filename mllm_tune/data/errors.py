"""One exception type for bad training data, and the counters of what the pipeline skipped.

Every `DataError` message starts with *where* the problem is (`file:line`, `file record 12
(id=abc)`, ...) and then says what is wrong, so a user can fix the record without a debugger.
`DataError.reason` is a short stable key ("missing_image", "too_long", ...) used to count skips;
`DataError.fatal` errors stop the pipeline even when it skips bad records.
"""
from __future__ import annotations

import collections
import logging

log = logging.getLogger("mllm_tune.data")

ON_ERROR = ("raise", "skip")


class DataError(ValueError):
  """A record (or file) that cannot be turned into training tokens."""

  def __init__(self, message: str, reason: str = "bad_record", fatal: bool = False):
    super().__init__(message)
    self.reason = reason
    self.fatal = fatal  # raise even when the pipeline is told to skip bad records


def check_on_error(on_error: str) -> str:
  if on_error not in ON_ERROR:
    raise ValueError(f"on_error={on_error!r}: choose one of {ON_ERROR}")
  return on_error


class SkipReport:
  """Counts skipped / truncated records by reason, in total and in the current epoch; logs the
  first few messages of each reason."""

  def __init__(self, max_logged_per_reason: int = 5):
    self.counts: collections.Counter[str] = collections.Counter()
    self.epoch_counts: collections.Counter[str] = collections.Counter()
    self.max_logged = max_logged_per_reason

  def add(self, reason: str, message: str) -> None:
    self.counts[reason] += 1
    self.epoch_counts[reason] += 1
    if self.counts[reason] <= self.max_logged:
      log.warning("%s", message)
    elif self.counts[reason] == self.max_logged + 1:
      log.warning("further '%s' messages are not logged (counted in the epoch summary)", reason)

  @staticmethod
  def describe(counts: collections.Counter) -> str:
    if not counts:
      return "no records skipped or truncated"
    parts = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
    return f"{sum(counts.values())} record(s) skipped or truncated ({parts})"

  def summary(self) -> str:
    return self.describe(self.counts)

  def end_epoch(self) -> str:
    """The epoch's summary; starts counting the next epoch."""
    text = self.describe(self.epoch_counts)
    self.epoch_counts = collections.Counter()
    return text

  def as_dict(self) -> dict[str, int]:
    return dict(sorted(self.counts.items()))

  def state(self) -> dict[str, dict[str, int]]:
    return {"total": self.as_dict(), "epoch": dict(sorted(self.epoch_counts.items()))}

  def load(self, counts: dict[str, int], epoch_counts: dict[str, int] | None = None) -> None:
    self.counts = collections.Counter({k: int(v) for k, v in counts.items()})
    self.epoch_counts = collections.Counter({k: int(v) for k, v in (epoch_counts or {}).items()})


def skipped_by_reason(batches) -> dict[str, int]:
  """What a batch iterator (a `BatchIterator`, or a `Prefetcher` around one) skipped or
  truncated, by reason: while batching (every epoch) and when its source file was read
  (malformed JSON lines, bad records). Objects without reports count nothing."""
  counts: collections.Counter[str] = collections.Counter()
  source = getattr(batches, "source", None) or getattr(
      getattr(batches, "iterator", None), "source", None)
  for report in (getattr(batches, "report", None), getattr(source, "report", None)):
    if report is not None:
      counts.update(report.as_dict())
  return dict(sorted(counts.items()))
