"""Prefix tuning (docs/methods.md §3.4; Li & Liang 2021): n = 20 virtual key/values per layer,
trained
through the reparameterization MLP (hidden 512); paper n = 10 (table-to-text), 200 (summaries)."""
import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.name = "prefix_tuning"
  c.num_virtual_tokens = 20
  c.prefix_projection = True
  c.encoder_hidden_size = 512
  return c
