"""Writes ArrayRecord shards: `{prefix}-PPP.array_record`, each made visible whole.

The prepare job (clips) and the pretokenize job (codes) write their shards
with it, into a local folder or a `gs://` one. ArrayRecord writes only to a
local file (its writer cannot open a `gs://` name), so each shard is written
to a local temporary file (storage.staged_file: a hidden `.{name}.*.tmp` next
to a local target, a temporary file for a remote one), then renamed into place
or uploaded as one object when it is complete. A reader never sees a
half-written shard; a crash leaves at most the temporary file, which
`leftover_names` recognises.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any

from array_record.python import array_record_module

from phenaki_jax import storage
from phenaki_jax.data import sources


def leftover_names(prefix: str, names: list[str]) -> list[str]:
  """Of the names in a shard folder, those of `prefix`'s shards and their temporary files."""
  return [n for n in names if n.startswith((f"{prefix}-", f".{prefix}-"))]


class ShardWriter:
  """Writes records to `{prefix}-PPP.array_record` files, each published whole."""

  def __init__(self, directory: str, prefix: str, max_records: int,
               options: str):
    self._dir, self._prefix = directory, prefix
    self._max, self._options = max_records, options
    self._writer = None
    self._count = 0
    self._stage = contextlib.ExitStack()
    self._final = self._tmp = ""
    self.shards: list[dict[str, Any]] = []

  def write(self, record: bytes) -> None:
    if self._writer is None:
      name = f"{self._prefix}-{len(self.shards):03d}{sources.SHARD_SUFFIX}"
      self._final = storage.join(self._dir, name)
      self._stage = contextlib.ExitStack()
      self._tmp = self._stage.enter_context(storage.staged_file(self._final))
      self._writer = array_record_module.ArrayRecordWriter(self._tmp, self._options)
    self._writer.write(record)
    self._count += 1
    if self._count >= self._max:
      self._finish()

  def _finish(self) -> None:
    self._writer.close()
    if not storage.is_remote(self._final):
      with storage.open_file(self._tmp) as f:  # durable before it becomes visible
        os.fsync(f.fileno())
    self._stage.close()  # renames or uploads the complete file
    self.shards.append({"file": storage.basename(self._final),
                        "records": self._count})
    self._writer, self._count = None, 0

  def close(self) -> None:
    if self._writer is not None:
      self._finish()
