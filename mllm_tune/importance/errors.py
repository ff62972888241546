"""The importance package's error."""
from __future__ import annotations


class ImportanceError(ValueError):
  """Bad importance request, or an importance file that does not fit this model."""
