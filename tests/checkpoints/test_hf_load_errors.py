"""Error handling of `load_pretrained` (and LLaVA's image-token check) on broken HF checkpoints.

Every test corrupts a copy of a tiny checkpoint written by transformers and asserts both the
error type and that the message names the offending file and the tensor / config field, so a
regression to an unhelpful message (or to a silent load) fails.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import struct

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import mllm_tune as mt
from mllm_tune.checkpoints.safetensors_io import CheckpointError
from mllm_tune.models.config import ConfigError
from mllm_tune.models.llava import check_image_token_count

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
IMAGE_TOKEN = 99


# ----------------------------------------------------------------------------- fixtures / helpers
@pytest.fixture(scope="module")
def base_dirs(tmp_path_factory):
  """Tiny HF checkpoints, written once: LLaVA (CLIP + Llama), bare Llama, sharded bare Llama."""
  import torch
  from transformers import (CLIPVisionConfig, LlamaConfig, LlamaForCausalLM, LlavaConfig,
                            LlavaForConditionalGeneration)
  torch.manual_seed(0)
  root = tmp_path_factory.mktemp("hf_base")
  vc = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, image_size=28, patch_size=14)
  tc = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
  dirs = {"llava": root / "llava", "llama": root / "llama", "sharded": root / "sharded"}
  LlavaForConditionalGeneration(LlavaConfig(vision_config=vc, text_config=tc,
                                            image_token_index=IMAGE_TOKEN)
                                ).save_pretrained(dirs["llava"])
  llm = LlamaForCausalLM(tc)
  llm.save_pretrained(dirs["llama"])
  llm.save_pretrained(dirs["sharded"], max_shard_size="20KB")
  assert (dirs["llava"] / SINGLE).is_file() and (dirs["llama"] / SINGLE).is_file()
  assert (dirs["sharded"] / INDEX).is_file() and not (dirs["sharded"] / SINGLE).exists()
  return dirs


@pytest.fixture(scope="module")
def llava(base_dirs):
  return mt.load_pretrained(str(base_dirs["llava"]))


def copy_of(base_dirs, which, tmp_path):
  d = tmp_path / which
  shutil.copytree(base_dirs[which], d)
  return d


def names(*parts: str) -> str:
  """A `match=` regex requiring every part literally, in any order."""
  return "(?s)^" + "".join(f"(?=.*{re.escape(p)})" for p in parts)


def rewrite_tensors(path, edit):
  """Load a safetensors file, let `edit(dict)` change it, write it back."""
  tensors = dict(load_file(str(path)))
  edit(tensors)
  save_file(tensors, str(path), metadata={"format": "pt"})


def edit_config(d, edit):
  cfg = json.loads((d / "config.json").read_text())
  edit(cfg)
  (d / "config.json").write_text(json.dumps(cfg, indent=2))


def read_raw(path):
  """(header dict, data bytes) of a safetensors file, parsed independently of mllm_tune."""
  raw = path.read_bytes()
  (n,) = struct.unpack("<Q", raw[:8])
  return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_raw(path, header_bytes: bytes, data: bytes):
  path.write_bytes(struct.pack("<Q", len(header_bytes)) + header_bytes + data)


def load(d):
  return mt.load_pretrained(str(d))


def test_base_checkpoints_load(base_dirs):
  """Positive control: the uncorrupted copies load, so every error below comes from the edit."""
  for which in ("llava", "llama", "sharded"):
    model, params = load(base_dirs[which])
    assert params["llm"]["embed"]["embedding"].shape == (100, 32)


# ----------------------------------------------------------------------------- 1, 2: key sets
def test_missing_tensor(base_dirs, tmp_path):
  d = copy_of(base_dirs, "llava", tmp_path)
  gone = "language_model.model.layers.1.self_attn.q_proj.weight"
  rewrite_tensors(d / SINGLE, lambda t: t.pop(gone))
  with pytest.raises(CheckpointError, match=names(str(d), "missing", gone)):
    load(d)


def test_missing_lm_head_bare_llm(base_dirs, tmp_path):
  d = copy_of(base_dirs, "llama", tmp_path)
  rewrite_tensors(d / SINGLE, lambda t: t.pop("lm_head.weight"))
  with pytest.raises(CheckpointError, match=names(str(d), "missing", "lm_head.weight")):
    load(d)


def test_unexpected_extra_tensor(base_dirs, tmp_path):
  d = copy_of(base_dirs, "llava", tmp_path)
  extra = "language_model.model.layers.2.self_attn.q_proj.weight"  # a layer the config lacks
  rewrite_tensors(d / SINGLE, lambda t: t.__setitem__(extra, np.zeros((32, 32), np.float32)))
  with pytest.raises(CheckpointError, match=names(str(d), "unexpected", extra)):
    load(d)


def test_unexpected_extra_tensor_in_shard_names_the_shard(base_dirs, tmp_path):
  """In a sharded checkpoint the message must say which shard holds the stray tensor."""
  d = copy_of(base_dirs, "sharded", tmp_path)
  index = json.loads((d / INDEX).read_text())
  shard = sorted(set(index["weight_map"].values()))[2]
  extra = "model.layers.7.mlp.up_proj.weight"
  rewrite_tensors(d / shard, lambda t: t.__setitem__(extra, np.zeros((64, 32), np.float32)))
  index["weight_map"][extra] = shard
  (d / INDEX).write_text(json.dumps(index))
  with pytest.raises(CheckpointError, match=names(shard, extra, "unexpected")):
    load(d)


# ----------------------------------------------------------------------------- 3: shapes
def test_shape_mismatch_q_proj(base_dirs, tmp_path):
  d = copy_of(base_dirs, "llava", tmp_path)
  bad = "language_model.model.layers.1.self_attn.q_proj.weight"
  rewrite_tensors(d / SINGLE, lambda t: t.__setitem__(bad, np.zeros((16, 32), np.float32)))
  with pytest.raises(CheckpointError, match=names(SINGLE, bad, "[16, 32]", "[32, 32]")):
    load(d)


def test_shape_mismatch_from_config_hidden_size(base_dirs, tmp_path):
  d = copy_of(base_dirs, "llava", tmp_path)
  edit_config(d, lambda c: c["text_config"].update(hidden_size=64))
  with pytest.raises(CheckpointError, match=names(
      SINGLE, "language_model.model.embed_tokens.weight", "[100, 32]", "[100, 64]")):
    load(d)


@pytest.mark.parametrize("key,shape", [
    ("language_model.model.norm.weight", (32, 1)),                      # copy rule
    ("language_model.model.layers.0.self_attn.q_proj.weight", (32, 32, 1)),  # linear rule
    ("vision_tower.embeddings.patch_embedding.weight", (32, 3, 14)),    # patch rule (4-D in HF)
], ids=["norm", "linear", "patch_embedding"])
def test_shape_mismatch_wrong_rank(base_dirs, tmp_path, key, shape):
  """A tensor of the wrong rank is a CheckpointError naming file and tensor for every rule kind."""
  d = copy_of(base_dirs, "llava", tmp_path)
  rewrite_tensors(d / SINGLE, lambda t: t.__setitem__(key, np.zeros(shape, np.float32)))
  with pytest.raises(CheckpointError, match=names(SINGLE, key, str(list(shape)))):
    load(d)


# ----------------------------------------------------------------------------- 4: dtypes
def test_non_float_dtype(base_dirs, tmp_path):
  d = copy_of(base_dirs, "llava", tmp_path)
  bad = "language_model.model.layers.0.mlp.up_proj.weight"
  rewrite_tensors(d / SINGLE, lambda t: t.__setitem__(bad, t[bad].astype(np.int64)))
  with pytest.raises(CheckpointError, match=names(SINGLE, bad, "I64", "floating")):
    load(d)


def test_non_float_dtype_in_shard_names_the_shard(base_dirs, tmp_path):
  d = copy_of(base_dirs, "sharded", tmp_path)
  weight_map = json.loads((d / INDEX).read_text())["weight_map"]
  bad = "model.layers.1.self_attn.k_proj.weight"
  shard = weight_map[bad]
  rewrite_tensors(d / shard, lambda t: t.__setitem__(bad, t[bad].astype(np.int32)))
  with pytest.raises(CheckpointError, match=names(shard, bad, "I32")):
    load(d)


# ----------------------------------------------------------------------------- 5, 11: config.json
def test_unsupported_model_type(base_dirs, tmp_path):
  d = copy_of(base_dirs, "llama", tmp_path)
  edit_config(d, lambda c: c.update(model_type="gpt2", architectures=["GPT2LMHeadModel"]))
  with pytest.raises(ConfigError, match=names(str(d / "config.json"), "model_type", "'gpt2'")):
    load(d)


def test_unsupported_text_model_type_in_llava(base_dirs, tmp_path):
  d = copy_of(base_dirs, "llava", tmp_path)
  edit_config(d, lambda c: c["text_config"].update(model_type="gpt2"))
  with pytest.raises(ConfigError, match=names(str(d / "config.json") + ":text_config",
                                              "model_type", "'gpt2'")):
    load(d)


@pytest.mark.parametrize("which,arch", [("llama", "LlamaForSequenceClassification"),
                                        ("llava", "LlavaNextForConditionalGeneration")])
def test_unsupported_architecture(base_dirs, tmp_path, which, arch):
  d = copy_of(base_dirs, which, tmp_path)
  edit_config(d, lambda c: c.update(architectures=[arch]))
  with pytest.raises(ConfigError, match=names(str(d / "config.json"), "architectures", arch)):
    load(d)


def _yarn_v5(c):
  c["rope_parameters"].update(rope_type="yarn", factor=4.0)


def _yarn_legacy(c):
  del c["rope_parameters"]
  c.update(rope_theta=10000.0, rope_scaling={"type": "yarn", "factor": 4.0})


def _yarn_llava(c):
  c["text_config"]["rope_parameters"].update(rope_type="yarn", factor=4.0)


@pytest.mark.parametrize("which,edit,where", [
    ("llama", _yarn_v5, "config.json"), ("llama", _yarn_legacy, "config.json"),
    ("llava", _yarn_llava, "config.json:text_config")], ids=["v5", "legacy", "llava"])
def test_unsupported_rope_type(base_dirs, tmp_path, which, edit, where):
  d = copy_of(base_dirs, which, tmp_path)
  edit_config(d, edit)
  with pytest.raises(ConfigError, match=names(str(d / where), "'yarn'")) as e:
    load(d)
  assert re.search(r"rope[_ ]type", str(e.value)), str(e.value)


def test_malformed_config_json(base_dirs, tmp_path):
  d = copy_of(base_dirs, "llama", tmp_path)
  (d / "config.json").write_text('{\n  "model_type": "llama",\n  "hidden_size": 32,,\n}\n')
  with pytest.raises(ConfigError, match=names(str(d / "config.json"), "line 3")):
    load(d)


def test_config_json_not_an_object(base_dirs, tmp_path):
  """Valid JSON that is not an object (here a list) must be a ConfigError, not AttributeError."""
  d = copy_of(base_dirs, "llama", tmp_path)
  (d / "config.json").write_text('[{"model_type": "llama"}]')
  with pytest.raises(ConfigError, match=names(str(d / "config.json"))):
    load(d)


# ----------------------------------------------------------------------------- 6: corrupt files
def test_truncated_safetensors_names_tensor(base_dirs, tmp_path):
  d = copy_of(base_dirs, "llava", tmp_path)
  path = d / SINGLE
  header, data = read_raw(path)
  header.pop("__metadata__", None)
  last = max(header, key=lambda k: header[k]["data_offsets"][1])
  assert header[last]["data_offsets"][1] == len(data)
  path.write_bytes(path.read_bytes()[:-4])  # only the last tensor loses bytes
  with pytest.raises(CheckpointError, match=names(str(path), "truncated", last)):
    load(d)


def test_truncated_inside_header(base_dirs, tmp_path):
  d = copy_of(base_dirs, "llava", tmp_path)
  path = d / SINGLE
  raw = path.read_bytes()
  (n,) = struct.unpack("<Q", raw[:8])
  path.write_bytes(raw[:8 + n // 2])
  with pytest.raises(CheckpointError, match=names(str(path), "truncated", str(n))):
    load(d)


@pytest.mark.parametrize("size", [0, 5])
def test_safetensors_shorter_than_8_bytes(base_dirs, tmp_path, size):
  d = copy_of(base_dirs, "llava", tmp_path)
  path = d / SINGLE
  path.write_bytes(path.read_bytes()[:size])
  with pytest.raises(CheckpointError, match=names(str(path), f"({size} bytes")):
    load(d)


def _bad_syntax(header, n):
  return (b"{" + b"x" * (n - 1))


def _non_utf8(header, n):
  return b"\xff" * n


def _not_an_object(header, n):
  return b"[]"


def _entry_without_offsets(header, n):
  del header["language_model.model.norm.weight"]["data_offsets"]
  return json.dumps(header).encode()


@pytest.mark.parametrize("corrupt", [_bad_syntax, _non_utf8, _not_an_object,
                                     _entry_without_offsets],
                         ids=["syntax", "non_utf8", "not_an_object", "entry_without_offsets"])
def test_corrupt_header(base_dirs, tmp_path, corrupt):
  """Any corrupt header is a CheckpointError naming the file (not KeyError/TypeError/...)."""
  d = copy_of(base_dirs, "llava", tmp_path)
  path = d / SINGLE
  header, data = read_raw(path)
  (n,) = struct.unpack("<Q", path.read_bytes()[:8])
  write_raw(path, corrupt(header, n), data)
  with pytest.raises(CheckpointError, match=names(str(path))):
    load(d)


def test_overlapping_data_offsets_rejected(base_dirs, tmp_path):
  """Two tensors pointing at the same bytes (a hole elsewhere) is a corrupt header, as the
  safetensors format (and `safetensors.safe_open`) say; loading it must not silently alias."""
  d = copy_of(base_dirs, "llava", tmp_path)
  path = d / SINGLE
  header, data = read_raw(path)
  a = "language_model.model.layers.0.input_layernorm.weight"
  b = "language_model.model.layers.1.input_layernorm.weight"
  assert header[a]["shape"] == header[b]["shape"] and header[a]["dtype"] == header[b]["dtype"]
  header[b]["data_offsets"] = list(header[a]["data_offsets"])
  write_raw(path, json.dumps(header).encode(), data)
  with pytest.raises(CheckpointError, match=names(str(path))):
    load(d)


# ----------------------------------------------------------------------------- 8: sharded index
def test_index_lists_tensor_in_wrong_shard(base_dirs, tmp_path):
  d = copy_of(base_dirs, "sharded", tmp_path)
  index = json.loads((d / INDEX).read_text())
  wm = index["weight_map"]
  name = "model.layers.0.mlp.down_proj.weight"
  wrong = next(s for s in sorted(set(wm.values())) if s != wm[name])
  wm[name] = wrong
  (d / INDEX).write_text(json.dumps(index))
  with pytest.raises(CheckpointError, match=names(str(d / INDEX), name, wrong)):
    load(d)


def test_index_lists_missing_shard_file(base_dirs, tmp_path):
  d = copy_of(base_dirs, "sharded", tmp_path)
  shard = sorted(set(json.loads((d / INDEX).read_text())["weight_map"].values()))[1]
  os.remove(d / shard)
  with pytest.raises(CheckpointError, match=names(str(d / shard), "not found")):
    load(d)


def test_malformed_index(base_dirs, tmp_path):
  d = copy_of(base_dirs, "sharded", tmp_path)
  (d / INDEX).write_text('{"metadata": {}}')  # no weight_map
  with pytest.raises(CheckpointError, match=names(str(d / INDEX), "weight_map")):
    load(d)


# ----------------------------------------------------------------------------- 9: missing files
def test_no_weights_file(base_dirs, tmp_path):
  d = copy_of(base_dirs, "llama", tmp_path)
  os.remove(d / SINGLE)
  with pytest.raises(CheckpointError, match=names(str(d), SINGLE, INDEX)):
    load(d)


def test_no_config_json(base_dirs, tmp_path):
  d = copy_of(base_dirs, "llama", tmp_path)
  os.remove(d / "config.json")
  with pytest.raises(CheckpointError, match=names(str(d), "config.json")):
    load(d)


# ----------------------------------------------------------------------------- 10: image tokens
def _ids_with_image_runs(runs: int, per_image: int):
  row = [1]
  for _ in range(runs):
    row += [IMAGE_TOKEN] * per_image + [5, 6]
  return jnp.array([row], jnp.int32)


@pytest.mark.parametrize("n_images", [1, 3, 0], ids=["too_few", "too_many", "none"])
def test_llava_image_token_count_mismatch(llava, n_images):
  model, params = llava
  per = model.config.image_seq_len
  assert per == 4 and model.config.image_token_id == IMAGE_TOKEN
  ids = _ids_with_image_runs(2, per)  # 8 image tokens = 2 images' worth
  px = None if n_images == 0 else jnp.zeros((n_images, 28, 28, 3), jnp.float32)
  with pytest.raises(ValueError, match=names(f"{2 * per} image tokens", f"id {IMAGE_TOKEN}",
                                             f"{n_images} image(s)", f"= {n_images * per}")):
    model.apply({"params": params}, ids, jnp.ones_like(ids), pixel_values=px)


def test_llava_image_token_count_match_passes_check(llava):
  """Positive control for the check above (cheap: no forward pass)."""
  model, _ = llava
  ids = _ids_with_image_runs(2, model.config.image_seq_len)
  check_image_token_count(ids, jnp.zeros((2, 28, 28, 3)), IMAGE_TOKEN,
                          model.config.image_seq_len)
