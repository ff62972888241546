"""CLIP dual encoder: logit parity with transformers' `CLIPModel` and checkpoint errors."""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig

from mllm_tune.checkpoints.clip_hf import load_clip
from safetensors.numpy import load_file, save_file

from mllm_tune.checkpoints.safetensors_io import CheckpointError
from mllm_tune.models.clip import eos_positions
from mllm_tune.models.config import ConfigError

ATOL = 1e-4
VOCAB = 50


def _hf_clip(eos_token_id: int, seed: int = 0) -> CLIPModel:
  torch.manual_seed(seed)
  tc = CLIPTextConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=12,
                      eos_token_id=eos_token_id, bos_token_id=1, pad_token_id=0,
                      initializer_range=0.1)
  vc = CLIPVisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                        num_attention_heads=4, image_size=28, patch_size=14,
                        initializer_range=0.1)
  cfg = CLIPConfig(text_config=tc.to_dict(), vision_config=vc.to_dict(), projection_dim=24,
                   logit_scale_init_value=2.0)
  return CLIPModel(cfg).eval()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  """eos 40 (first-EOS pooling), saved once for the module."""
  hf = _hf_clip(40)
  d = str(tmp_path_factory.mktemp("clip") / "hf")
  hf.save_pretrained(d)
  return hf, d


def _texts(eos: int):
  """Right-padded (pad 0) batch of 3 captions whose ids above `eos` come before it, so pooling at
  argmax(ids) and at the first EOS pick different tokens; row 2 holds EOS twice."""
  rows = [[1, 45, 7, eos, 0, 0, 0, 0], [1, 9, 48, 3, 6, eos, 0, 0],
          [1, 4, eos, 44, 5, 49, 11, eos]]
  ids = np.asarray(rows, np.int64)
  lengths = np.array([4, 6, 8])
  mask = (np.arange(ids.shape[1])[None] < lengths[:, None]).astype(np.int64)
  return ids, mask


def _pixels(n: int) -> np.ndarray:
  return np.random.RandomState(1).randn(n, 28, 28, 3).astype(np.float32)


def _hf_out(hf, ids, mask, px):
  with torch.no_grad():
    return hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
              pixel_values=torch.tensor(np.ascontiguousarray(px.transpose(0, 3, 1, 2))))


def _check_parity(model, params, hf, eos):
  ids, mask = _texts(eos)
  px = _pixels(4)
  ours = jax.jit(model.apply)({"params": params}, px, ids, mask)
  ref = _hf_out(hf, ids, mask, px)
  assert ours.logits_per_image.shape == (4, 3) and ours.logits_per_text.shape == (3, 4)
  np.testing.assert_allclose(np.asarray(ours.logits_per_image), ref.logits_per_image.numpy(),
                             atol=ATOL, rtol=0)
  np.testing.assert_allclose(np.asarray(ours.logits_per_text), ref.logits_per_text.numpy(),
                             atol=ATOL, rtol=0)
  np.testing.assert_allclose(np.asarray(ours.text_embeds), ref.text_embeds.numpy(), atol=ATOL)
  np.testing.assert_allclose(np.asarray(ours.image_embeds), ref.image_embeds.numpy(), atol=ATOL)


def test_logits_match_transformers_first_eos_pooling(hf_dir):
  hf, d = hf_dir
  model, params = load_clip(d)
  assert model.config.text.eos_token_id == 40 and model.config.vision.num_layers == 3
  ids, _ = _texts(40)
  first_eos = np.asarray(eos_positions(jnp.asarray(ids), 40))
  assert (first_eos != ids.argmax(-1)).all()  # the pooling rule decides the result
  np.testing.assert_array_equal(first_eos, [3, 5, 2])
  _check_parity(model, params, hf, 40)


def test_logits_match_transformers_legacy_argmax_pooling(tmp_path):
  hf = _hf_clip(2, seed=1)  # eos_token_id == 2: transformers pools at argmax(input_ids)
  hf.save_pretrained(str(tmp_path))
  model, params = load_clip(str(tmp_path))
  ids, _ = _texts(2)
  np.testing.assert_array_equal(np.asarray(eos_positions(jnp.asarray(ids), 2)), ids.argmax(-1))
  _check_parity(model, params, hf, 2)


def test_padding_does_not_change_the_text_embedding(hf_dir):
  _, d = hf_dir
  model, params = load_clip(d)
  row = [1, 45, 7, 40]
  encode = jax.jit(lambda ids, mask: model.apply({"params": params}, ids, mask,
                                                 method="encode_text"))
  alone = encode(np.asarray([row]), np.ones((1, 4), np.int32))
  ids = np.asarray([row + [0] * 4])
  padded = encode(ids, (ids > 0).astype(np.int32))
  np.testing.assert_allclose(np.asarray(padded), np.asarray(alone), atol=1e-6)


# ----------------------------------------------------------------------------- bad checkpoints
def _rewrite(d: str, edit) -> None:
  """Rewrite model.safetensors with `edit(dict name -> array)` applied."""
  fn = os.path.join(d, "model.safetensors")
  tensors = load_file(fn)
  edit(tensors)
  save_file(tensors, fn, metadata={"format": "pt"})


def _copy(hf_dir, tmp_path) -> str:
  hf, _ = hf_dir
  d = str(tmp_path / "bad")
  hf.save_pretrained(d)
  return d


def test_missing_tensor_is_named(hf_dir, tmp_path):
  d = _copy(hf_dir, tmp_path)
  _rewrite(d, lambda t: t.pop("text_model.encoder.layers.1.mlp.fc2.bias"))
  with pytest.raises(CheckpointError, match=r"1 missing.*text_model\.encoder\.layers\.1\.mlp"
                                            r"\.fc2\.bias"):
    load_clip(d)


def test_wrong_shape_names_tensor_and_file(hf_dir, tmp_path):
  d = _copy(hf_dir, tmp_path)
  _rewrite(d, lambda t: t.update({"text_projection.weight": np.zeros((24, 31), np.float32)}))
  with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'text_projection\.weight'"
                                            r" has shape \[24, 31\].*\[24, 32\]"):
    load_clip(d)


def test_unexpected_tensor_is_named_and_position_ids_ignored(hf_dir, tmp_path):
  d = _copy(hf_dir, tmp_path)
  _rewrite(d, lambda t: t.update({"text_model.embeddings.position_ids":
                                  np.arange(12, dtype=np.int64)[None]}))
  model, params = load_clip(d)  # an old transformers buffer: ignored
  _check_parity(model, params, hf_dir[0], 40)
  _rewrite(d, lambda t: t.update({"text_model.extra_head.weight": np.zeros(3, np.float32)}))
  with pytest.raises(CheckpointError, match=r"1 unexpected.*text_model\.extra_head\.weight "
                                            r"\(in model\.safetensors\)"):
    load_clip(d)


def test_config_errors_name_the_field(hf_dir, tmp_path):
  d = _copy(hf_dir, tmp_path)
  cfg_file = os.path.join(d, "config.json")
  with open(cfg_file) as f:
    cfg = json.load(f)
  with open(cfg_file, "w") as f:
    json.dump({**cfg, "model_type": "siglip"}, f)
  with pytest.raises(ConfigError, match="model_type 'siglip' is not 'clip'"):
    load_clip(d)
  del cfg["text_config"]["hidden_size"]
  with open(cfg_file, "w") as f:
    json.dump(cfg, f)
  with pytest.raises(ConfigError, match=r"config\.json:text_config: required field "
                                        r"'hidden_size'"):
    load_clip(d)
