"""Writes ArrayRecord shards: `{prefix}-PPP.array_record`, each made visible atomically.

The prepare job (clips) and the pretokenize job (codes) write their shards
with it; a reader never sees a half-written shard (write to .tmp, fsync, rename).
"""
from __future__ import annotations

import os
from typing import Any

from array_record.python import array_record_module

from phenaki_jax.data import sources


class ShardWriter:
  """Writes records to `{prefix}-PPP.array_record` files, each atomically."""

  def __init__(self, directory: str, prefix: str, max_records: int,
               options: str):
    self._dir, self._prefix = directory, prefix
    self._max, self._options = max_records, options
    self._writer = None
    self._count = 0
    self._tmp = self._final = ""
    self.shards: list[dict[str, Any]] = []

  def write(self, record: bytes) -> None:
    if self._writer is None:
      name = f"{self._prefix}-{len(self.shards):03d}{sources.SHARD_SUFFIX}"
      self._final = os.path.join(self._dir, name)
      self._tmp = self._final + ".tmp"
      os.makedirs(self._dir, exist_ok=True)
      self._writer = array_record_module.ArrayRecordWriter(self._tmp,
                                                           self._options)
    self._writer.write(record)
    self._count += 1
    if self._count >= self._max:
      self._finish()

  def _finish(self) -> None:
    self._writer.close()
    with open(self._tmp, "rb") as f:  # durable before it becomes visible
      os.fsync(f.fileno())
    os.replace(self._tmp, self._final)
    self.shards.append({"file": os.path.basename(self._final),
                        "records": self._count})
    self._writer, self._count = None, 0

  def close(self) -> None:
    if self._writer is not None:
      self._finish()
