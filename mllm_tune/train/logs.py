"""Metric sinks: JSON lines and TensorBoard event files written without TensorFlow.

The event file is TFRecord framing (length, masked CRC32C, payload, masked CRC32C) around
hand-encoded `tensorflow.Event` protos holding scalar `Summary.Value`s, which TensorBoard reads.
"""
from __future__ import annotations

import json
import os
import socket
import struct
import time

import jax

_CRC_TABLE = []
for _i in range(256):
  _c = _i
  for _ in range(8):
    _c = (_c >> 1) ^ 0x82F63B78 if _c & 1 else _c >> 1
  _CRC_TABLE.append(_c)


def crc32c(data: bytes) -> int:
  crc = 0xFFFFFFFF
  for b in data:
    crc = _CRC_TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
  out = bytearray()
  while True:
    b = n & 0x7F
    n >>= 7
    out.append(b | (0x80 if n else 0))
    if not n:
      return bytes(out)


def _field(num: int, wire: int) -> bytes:
  return _varint((num << 3) | wire)


def _bytes_field(num: int, payload: bytes) -> bytes:
  return _field(num, 2) + _varint(len(payload)) + payload


def encode_event(wall_time: float, step: int | None = None, scalars: dict | None = None,
                 file_version: str | None = None) -> bytes:
  out = _field(1, 1) + struct.pack("<d", wall_time)
  if step is not None:
    out += _field(2, 0) + _varint(step)
  if file_version is not None:
    out += _bytes_field(3, file_version.encode())
  if scalars:
    summary = b"".join(
        _bytes_field(1, _bytes_field(1, tag.encode()) + _field(2, 5) + struct.pack("<f", v))
        for tag, v in scalars.items())
    out += _bytes_field(5, summary)
  return out


def frame(record: bytes) -> bytes:
  head = struct.pack("<Q", len(record))
  return head + struct.pack("<I", _masked_crc(head)) + record + struct.pack(
      "<I", _masked_crc(record))


def read_records(path: str) -> list[bytes]:
  """TFRecord payloads of a file, checking both CRCs (used by tests and `report`)."""
  out = []
  with open(path, "rb") as f:
    data = f.read()
  i = 0
  while i < len(data):
    head = data[i:i + 8]
    (n,) = struct.unpack("<Q", head)
    if struct.unpack("<I", data[i + 8:i + 12])[0] != _masked_crc(head):
      raise ValueError(f"{path}: bad length CRC at byte {i}")
    rec = data[i + 12:i + 12 + n]
    if struct.unpack("<I", data[i + 12 + n:i + 16 + n])[0] != _masked_crc(rec):
      raise ValueError(f"{path}: bad data CRC at byte {i}")
    out.append(rec)
    i += 16 + n
  return out


class TensorBoardWriter:
  def __init__(self, logdir: str):
    os.makedirs(logdir, exist_ok=True)
    name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.mllm_tune"
    self.path = os.path.join(logdir, name)
    self._f = open(self.path, "ab")
    self._f.write(frame(encode_event(time.time(), file_version="brain.Event:2")))
    self._f.flush()

  def scalars(self, step: int, values: dict[str, float]) -> None:
    self._f.write(frame(encode_event(time.time(), step, {k: float(v) for k, v in
                                                         values.items()})))
    self._f.flush()

  def close(self) -> None:
    self._f.close()


def drop_records_after(path: str, step: int) -> int:
  """Rewrite the JSONL log `path` without its records past `step` (all of them at step 0)
  and without a line a kill cut short: a resumed run redoes the steps after its checkpoint and
  logs them again. Returns how many records were dropped; a missing file drops none. Only
  process 0 rewrites (every process of a multi-host run resumes the same directory)."""
  if not os.path.isfile(path) or jax.process_index() != 0:
    return 0
  with open(path) as f:
    lines = [line if line.endswith("\n") else line + "\n" for line in f if line.strip()]

  def kept(line: str) -> bool:
    try:
      return bool(step) and json.loads(line).get("step", 0) <= step
    except json.JSONDecodeError:  # the last line of a killed run, cut short
      return False
  keep = [line for line in lines if kept(line)]
  if len(keep) < len(lines):
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
      f.writelines(keep)
    os.replace(tmp, path)
  return len(lines) - len(keep)


class JsonlWriter:
  def __init__(self, path: str):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    self._f = open(path, "a")

  def write(self, record: dict) -> None:
    self._f.write(json.dumps(record, sort_keys=True) + "\n")
    self._f.flush()

  def close(self) -> None:
    self._f.close()


def bar_scores(record: dict) -> dict:
  """Target and retention side by side on the progress bar (mean over sets, percent)."""
  keys = {"tgt": "tradeoff/A_down", "ret": "tradeoff/A_up"}
  return {k: f"{record[v]:.1f}" for k, v in keys.items() if v in record}
