"""Minimal, streaming safetensors reader/writer on top of numpy memory maps.

We read the format ourselves (8-byte little-endian header size, JSON header, raw bytes) so that
(a) bf16/fp16/fp32 all come back as numpy views without a framework, (b) tensors are read lazily,
one at a time, straight from the page cache, and (c) a truncated or corrupt file yields an error
that names the file and the tensor.
"""
from __future__ import annotations

import json
import os
import struct
from typing import Callable, Iterable

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


class CheckpointError(ValueError):
  """A checkpoint file is missing, truncated, corrupt or does not match the model."""


class SafetensorsFile:
  """Lazy view of one `.safetensors` file: `keys()`, `info(name)`, `get(name)` (read-only)."""

  def __init__(self, path: str):
    self.path = path
    try:
      size = os.path.getsize(path)
      with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
          raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
          raise CheckpointError(f"{path}: truncated or corrupt safetensors file: header claims "
                                f"{n} bytes but the file has {size} bytes")
        header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from e
    except FileNotFoundError as e:
      raise CheckpointError(f"{path}: file not found") from e
    if not isinstance(header, dict):
      raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    self.metadata = header.pop("__metadata__", None) or {}
    self._header = header
    self._data_start = 8 + n
    data_size = size - self._data_start
    for name, h in header.items():
      if not (isinstance(h, dict) and {"dtype", "shape", "data_offsets"} <= set(h)):
        raise CheckpointError(f"{path}: corrupt safetensors header: entry '{name}' lacks "
                              "dtype/shape/data_offsets")
      if h.get("dtype") not in DTYPES:
        raise CheckpointError(f"{path}: tensor '{name}' has unsupported dtype {h.get('dtype')}")
      begin, end = h["data_offsets"]
      want = int(np.prod(h["shape"], dtype=np.int64)) * DTYPES[h["dtype"]].itemsize
      if end - begin != want:
        raise CheckpointError(f"{path}: tensor '{name}' has {end - begin} bytes for shape "
                              f"{h['shape']} {h['dtype']} ({want} expected): corrupt header")
      if end > data_size:
        raise CheckpointError(f"{path}: truncated file: tensor '{name}' needs bytes "
                              f"[{begin}, {end}) of the data section but it has {data_size}")
    expected_start = 0
    for name, h in sorted(header.items(), key=lambda kv: tuple(kv[1]["data_offsets"])):
      if h["data_offsets"][0] != expected_start:
        raise CheckpointError(f"{path}: corrupt safetensors header: tensor '{name}' starts at "
                              f"byte {h['data_offsets'][0]}, expected {expected_start} "
                              "(overlapping or gapped tensors)")
      expected_start = h["data_offsets"][1]
    self._mmap = np.memmap(path, dtype=np.uint8, mode="r") if size > self._data_start else None

  def keys(self) -> list[str]:
    return list(self._header)

  def info(self, name: str) -> tuple[tuple[int, ...], str]:
    h = self._header[name]
    return tuple(h["shape"]), h["dtype"]

  def get(self, name: str) -> np.ndarray:
    h = self._header[name]
    begin, end = h["data_offsets"]
    dtype = DTYPES[h["dtype"]]
    if end == begin:
      return np.zeros(h["shape"], dtype)
    raw = self._mmap[self._data_start + begin:self._data_start + end]
    return raw.view(dtype).reshape(h["shape"])


# A tensor to write: (name, shape, dtype, fetch) where fetch() returns the array when needed.
TensorSpec = tuple[str, tuple[int, ...], np.dtype, Callable[[], np.ndarray]]


def write_safetensors(path: str, specs: Iterable[TensorSpec],
                      metadata: dict[str, str] | None = None) -> int:
  """Write tensors one at a time (each `fetch()` is called once); returns bytes of tensor data."""
  specs = list(specs)
  header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
  offset = 0
  for name, shape, dtype, _ in specs:
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    header[name] = {"dtype": DTYPE_NAMES[np.dtype(dtype)], "shape": list(shape),
                    "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for name, shape, dtype, fetch in specs:
      # not np.ascontiguousarray: it turns a 0-d array into shape (1,)
      arr = np.asarray(fetch(), dtype=dtype, order="C")
      if arr.shape != tuple(shape):
        raise CheckpointError(f"{path}: tensor '{name}' has shape {arr.shape}, declared {shape}")
      f.write(arr.tobytes())
  os.replace(tmp, path)
  return offset
