"""Data settings for the offline benchmark's generated sets (`data.kind = "offline"`).

`source` names an `mllm_tune.data.offline_vqa` source: `digits` (scikit-learn's handwritten
digits, the benchmark's downstream task), `general` (the general mix), or one family (`color`,
`letter`, ...). Records go through the regular pipeline (ChatML template, assistant-only loss,
CLIP preprocessing of the model directory); a row holds one record (no packing), as in the
benchmark's own tuning (`mllm_tune/benchmark/fit.py`).
"""
import ml_collections


def get_config(source: str = "digits"):
  c = ml_collections.ConfigDict()
  c.kind = "offline"
  c.source = source
  c.split = "train"
  c.num_records = 0               # 0 = the whole split (the synthetic families need a number)
  c.image_size = 32               # rendered size before the image processor
  c.source_seed = 0               # the generator's seed (the benchmark's data_seed)
  c.template = "chatml"
  c.seq_len = 128                 # longest record: 64 image tokens + the chat turns
  c.batch_size = 32
  c.packing = False
  c.overflow = "fail"             # never cut an answer off
  c.on_error = "raise"
  c.seed = 0                      # shuffling
  c.shuffle = True
  c.num_workers = 0
  c.prefetch = 2
  return c
