"""Minimal safetensors reader/writer on numpy memory maps.

Reading goes one tensor at a time through ``np.memmap`` (nothing else is loaded), and
bfloat16 comes through ``ml_dtypes`` bit-exactly, which ``safetensors.numpy`` cannot do.
Sharded checkpoints are read through ``model.safetensors.index.json``.
"""

from __future__ import annotations

from collections.abc import Iterable
import hashlib
import json
import os
import struct

import ml_dtypes
import numpy as np

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

_DTYPES = {
  "F64": np.dtype(np.float64),
  "F32": np.dtype(np.float32),
  "F16": np.dtype(np.float16),
  "BF16": np.dtype(ml_dtypes.bfloat16),
  "I64": np.dtype(np.int64),
  "I32": np.dtype(np.int32),
  "I16": np.dtype(np.int16),
  "I8": np.dtype(np.int8),
  "U8": np.dtype(np.uint8),
  "BOOL": np.dtype(np.bool_),
}
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}


class TensorIndex:
  """Which file holds which tensor, for a single-file or sharded checkpoint directory."""

  def __init__(self, directory: str | os.PathLike, filename: str | None = None):
    """``filename``: read that one file of ``directory`` instead of the checkpoint."""
    directory = os.fspath(directory)
    index_path = os.path.join(directory, INDEX_FILE)
    weight_map = None
    if filename is not None:
      files = [filename]
    elif os.path.isfile(index_path):
      with open(index_path) as f:
        weight_map = json.load(f)["weight_map"]
      files = sorted(set(weight_map.values()))
    elif os.path.isfile(os.path.join(directory, SINGLE_FILE)):
      files = [SINGLE_FILE]
    else:
      raise FileNotFoundError(
        f"{directory} is not a safetensors checkpoint: neither {SINGLE_FILE} nor "
        f"{INDEX_FILE} is there"
      )
    self._headers = {}
    for name in files:
      path = os.path.join(directory, name)
      if not os.path.isfile(path):
        raise FileNotFoundError(f"{name} is missing from {directory}")
      self._headers[path] = _read_header(path)
    self._location = {}
    for path, (header, _) in self._headers.items():
      for tensor in header:
        self._location[tensor] = path
    for tensor, name in (weight_map or {}).items():
      if self._location.get(tensor) != os.path.join(directory, name):
        raise ValueError(f"{INDEX_FILE} places tensor {tensor!r} in {name}, which does not hold it")

  def names(self) -> list[str]:
    return list(self._location)

  def shape(self, name: str) -> tuple[int, ...]:
    header, _ = self._headers[self._location[name]]
    return tuple(header[name]["shape"])

  def read(self, name: str) -> np.ndarray:
    """A read-only memory map of one tensor."""
    path = self._location[name]
    header, data_start = self._headers[path]
    info = header[name]
    if info["dtype"] not in _DTYPES:
      raise ValueError(f"tensor {name!r} in {path} has unsupported dtype {info['dtype']}")
    start, end = info["data_offsets"]
    dtype = _DTYPES[info["dtype"]]
    shape = tuple(info["shape"])
    if end - start != dtype.itemsize * int(np.prod(shape, dtype=np.int64)):
      raise ValueError(f"tensor {name!r} in {path}: byte range does not match its shape")
    if end == start:
      return np.zeros(shape, dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=data_start + start, shape=shape)


def _read_header(path: str):
  """(tensor index, data offset) of a safetensors file, checked against the file's size.

  A truncated or damaged file is named as corrupt here, rather than failing later in a
  memory map of bytes that are not there.
  """
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    prefix = f.read(8)
    if len(prefix) != 8:
      raise ValueError(f"{path} is corrupt: {size} bytes, too short for a safetensors file")
    (length,) = struct.unpack("<Q", prefix)
    if length > size - 8:
      raise ValueError(
        f"{path} is corrupt: its header claims {length} bytes but the file has {size} "
        "(truncated, or not a safetensors file)"
      )
    try:
      header = json.loads(f.read(length))
      header.pop("__metadata__", None)
      end = 8 + length + max((int(t["data_offsets"][1]) for t in header.values()), default=0)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
      raise ValueError(f"{path} is corrupt: its header is not a tensor index ({e!r})") from None
  if end > size:
    raise ValueError(
      f"{path} is corrupt: its tensors end at byte {end} but the file has {size} (truncated)"
    )
  return header, 8 + length


def write_safetensors(
  path: str, tensors: Iterable[tuple[str, np.ndarray]], metadata: dict[str, str] | None = None
) -> None:
  """Writes (name, array) pairs in order, streaming the data after the header."""
  pairs = list(tensors)
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(_header(pairs, metadata))
    for _, array in pairs:
      f.write(np.ascontiguousarray(array).tobytes())
  os.replace(tmp, path)


def safetensors_digest(
  tensors: Iterable[tuple[str, np.ndarray]], metadata: dict[str, str] | None = None
) -> str:
  """SHA-256 of the file :func:`write_safetensors` would write, without writing it."""
  pairs = list(tensors)
  h = hashlib.sha256(_header(pairs, metadata))
  for _, array in pairs:
    h.update(np.ascontiguousarray(array).tobytes())
  return h.hexdigest()


def _header(tensors: list[tuple[str, np.ndarray]], metadata: dict[str, str] | None) -> bytes:
  """The header's length (8 bytes) and the header, which indexes the data that follows."""
  header: dict = {"__metadata__": metadata or {"format": "pt"}}
  offset = 0
  for name, array in tensors:
    nbytes = array.size * array.dtype.itemsize
    header[name] = {
      "dtype": _NAMES[array.dtype],
      "shape": list(array.shape),
      "data_offsets": [offset, offset + nbytes],
    }
    offset += nbytes
  encoded = json.dumps(header, separators=(",", ":")).encode()
  encoded += b" " * (-len(encoded) % 8)  # Align the data section as the reference writer does.
  return struct.pack("<Q", len(encoded)) + encoded
