"""Trainable tokens (docs/methods.md §2.9; peft TrainableTokens): train the embedding rows of the
listed token ids only (e.g. tokens added to the tokenizer), initialised to their base rows; a tied
LM head reads the same rows. In an experiment config: `c.method = trainable_tokens.get_config()`
and `c.method.token_indices = (32000, 32001)`; beside LoRA (peft's `trainable_token_indices`):
`c.method = ConfigDict({"methods": [lora.get_config(), trainable_tokens.get_config()]})`."""
import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.name = "trainable_tokens"
  c.token_indices = ()  # the ids of the tokens to train (required: empty is refused)
  return c
