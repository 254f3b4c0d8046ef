"""The tensors of a .safetensors file on local or gs:// storage (T5 and CLIP weights).

A local file is memory-mapped by `safetensors` itself. A remote one is never
downloaded whole: its header is read, then each tensor asked for by one
ranged read, so a T5ForConditionalGeneration checkpoint costs no transfer for
its decoder.
"""
from __future__ import annotations

import json
import os
import struct

from phenaki_jax import storage


class SafetensorsReader:
  """The tensors of a .safetensors file: keys(), shape(key), get_tensor(key) -> numpy.

  Local files are memory-mapped by `safetensors` itself. A remote file is not
  downloaded: its header is read, then each tensor asked for by a ranged
  read, so a T5ForConditionalGeneration checkpoint costs no transfer for its
  decoder.
  """

  def __init__(self, p: storage.PathLike):
    self.path = os.fspath(p)
    self._handle = self._file = None
    if not storage.is_remote(self.path):
      from safetensors import safe_open  # pylint: disable=g-import-not-at-top
      if not storage.isfile(self.path):
        raise storage.StorageNotFoundError(f"reading {self.path}: no such file")
      self._handle = safe_open(self.path, framework="np")
      return
    self._file = storage.open_file(self.path, "rb")
    try:
      n = struct.unpack("<Q", self._file.read(8))[0]
      if not 2 <= n <= 1 << 30:
        raise ValueError(f"header length {n}")
      header = json.loads(self._file.read(n))
    except Exception as e:  # pylint: disable=broad-except
      self.close()
      raise storage.StorageError(f"reading {self.path}: not a safetensors file ({e})") from e
    header.pop("__metadata__", None)
    self._header, self._base = header, 8 + n

  def keys(self) -> list[str]:
    if self._handle is not None:
      return list(self._handle.keys())
    return list(self._header)

  def shape(self, key: str) -> tuple[int, ...]:
    if self._handle is not None:
      return tuple(self._handle.get_slice(key).get_shape())
    return tuple(self._header[key]["shape"])

  def get_tensor(self, key: str):
    if self._handle is not None:
      return self._handle.get_tensor(key)
    import numpy as np  # pylint: disable=g-import-not-at-top
    entry = self._header[key]
    begin, end = entry["data_offsets"]
    try:
      self._file.seek(self._base + begin)
      data = self._file.read(end - begin)
    except Exception as e:  # pylint: disable=broad-except
      raise storage.wrap_error(self.path, f"reading tensor {key} of", e) from e
    if len(data) != end - begin:
      raise storage.StorageError(f"reading {self.path}: tensor {key} is cut short")
    return np.frombuffer(data, _safetensors_dtype(entry["dtype"], self.path)).reshape(
        entry["shape"]).copy()

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None
    self._handle = None

  def __enter__(self) -> "SafetensorsReader":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _safetensors_dtype(name: str, p: str):
  import ml_dtypes  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  dtypes = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
            "BF16": ml_dtypes.bfloat16, "F8_E4M3": ml_dtypes.float8_e4m3fn,
            "F8_E5M2": ml_dtypes.float8_e5m2, "I64": np.int64, "I32": np.int32,
            "I16": np.int16, "I8": np.int8, "U64": np.uint64, "U32": np.uint32,
            "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_}
  if name not in dtypes:
    raise storage.StorageError(f"reading {p}: unsupported safetensors dtype {name}")
  return np.dtype(dtypes[name]).newbyteorder("<")
