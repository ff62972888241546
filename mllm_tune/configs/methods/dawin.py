"""DaWin (docs/methods.md §6.2, ICLR 2025, naver-ai/dawin `script/dawin.sh`): entropy-ratio lambda
with the offset adjustment, a K = 3 Beta mixture (only 3 merged models), answer entropy over <= 16
greedy tokens. Consumed by `mllm_tune.posthoc.dawin.dawin_coefficients(h0, hft,
offset_adjustment, num_components)`; `max_answer_tokens` by the evaluation that computes H."""
import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.name = "dawin"
  c.offset_adjustment = True
  c.num_components = 3
  c.max_answer_tokens = 16
  return c
