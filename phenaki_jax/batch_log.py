"""A hash of every batch a trainer steps on, so lost or repeated data is visible.

WORKDIR/batch_hashes/process_I.jsonl gets one line per step: {"step", "kind",
"hash"}, the hash (blake2b, 64 bits) of this process's slice of the global
batch (its arrays' bytes, captions as UTF-8, in key order); the global batch
of a step is the union of the processes' slices. A run that resumes from
step S first drops the lines after S (steps a killed run did after its last
checkpoint, which it does again), so the file always holds exactly the
batches the checkpointed model has seen: two runs saw the same data exactly
when their files are equal.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Mapping

import jax
import numpy as np

from phenaki_jax import storage


def batch_hash(batch: Mapping[str, Any]) -> str:
  h = hashlib.blake2b(digest_size=8)
  for key in sorted(batch):
    value = np.asarray(batch[key])
    h.update(key.encode())
    if value.dtype.kind in "OUS":
      for item in value.reshape(-1):
        h.update(str(item).encode("utf-8") + b"\0")
    else:
      h.update(str(value.dtype).encode() + str(value.shape).encode())
      h.update(np.ascontiguousarray(value).tobytes())
  return h.hexdigest()


class BatchHashLog:
  """Appends step hashes, buffered; `flush` at log and checkpoint steps.

  Each process writes its own file (local or gs://, storage.AppendOnlyText).
  """

  def __init__(self, workdir: str, start_step: int):
    self.path = storage.join(workdir, "batch_hashes", f"process_{jax.process_index()}.jsonl")
    self._pending: list[str] = []
    kept = []
    if storage.exists(self.path):
      for line in storage.read_text(self.path).splitlines():
        try:
          if json.loads(line)["step"] <= start_step:
            kept.append(line + "\n")
        except (ValueError, KeyError):
          break  # a line cut by a kill: everything after it is gone too
    self._file = storage.AppendOnlyText(self.path)
    self._file.replace("".join(kept))

  def add(self, step: int, kind: str, batch: Mapping[str, Any]) -> None:
    self._pending.append(json.dumps({"step": int(step), "kind": kind,
                                     "hash": batch_hash(batch)}) + "\n")

  def flush(self) -> None:
    if self._pending:
      self._file.append("".join(self._pending))
      self._pending = []


def read(workdir: str, process: int = 0) -> dict[int, str]:
  """{step: hash} of a workdir's log (the last line wins for a repeated step)."""
  path = storage.join(workdir, "batch_hashes", f"process_{process}.jsonl")
  out = {}
  for line in storage.read_text(path).splitlines():
    row = json.loads(line)
    out[row["step"]] = row["hash"]
  return out
