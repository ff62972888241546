"""Moved to `mllm_tune.tuning.peft` (PEFT export / import); this alias keeps the documented path."""
from mllm_tune.tuning.peft import IMPORTERS, EXPORTERS, export_peft, import_peft  # noqa: F401
from mllm_tune.tuning.peft.format import *  # noqa: F401,F403
