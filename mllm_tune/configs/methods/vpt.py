"""Visual prompt tuning (docs/methods.md §3.7; Jia et al. 2022): p prompt tokens in the vision
tower, shallow by default (`--config.method.deep=True` for VPT-deep); prompt dropout 0.0 (tune 0.1).
p = 10 is a [choice]: the paper tunes p per task (1 to 200)."""
import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.name = "vpt"
  c.num_tokens = 10
  c.deep = False
  c.dropout = 0.0
  return c
