"""Prompt tuning (docs/methods.md §3.3; Lester et al. 2021): n = 20 soft tokens, peft SAMPLE_VOCAB
init. The paper trains them with Adafactor at lr 0.3."""
import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.name = "prompt_tuning"
  c.num_virtual_tokens = 20
  c.prompt_init = "sample_vocab"  # sample_vocab | token_ids | random
  c.init_token_ids = ()
  return c
