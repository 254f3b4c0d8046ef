"""Random access to decoded ArrayRecord records that survives damaged shards.

Prepared clip shards and pre-tokenised shards are read through this. A long
run should not die on one bad record hours in, nor silently lose a shard:

  * a shard file that cannot be opened (truncated, not ArrayRecord) is left
    out at start, with a warning naming it; if none can be opened, the error
    names every file and why;
  * a record whose chunk fails ArrayRecord's checksum, or whose payload does
    not decode (`DamagedRecordError`), is replaced by the next readable
    record, with a warning naming the shard file and the record's position in
    it. The substitute is a fixed function of the index, so batches keep
    their size and a resumed run reads exactly the stream it would have.

A record that decodes but is refused for another reason (say a newer record
version) is not damage: that error propagates, as every record would be
skipped otherwise.

Shards may be local files or `gs://` objects: array_record reads both (its
riegeli GCS reader, also inside grain's worker processes), so no bucket
needs mounting. A shard object that vanishes while a run reads it (deleted,
or a folder rewritten under a running job) is not damage either: the run
stops with `UnreadableShardsError` naming it, rather than substitute every
one of its records.
"""
from __future__ import annotations

import bisect
import itertools
from typing import Any, Callable, Sequence

from absl import logging
import msgpack

from phenaki_jax import storage


# Past this many damaged records in a row the shards are not damaged but gone
# (deleted, unmounted) or not this format: stop rather than scan them all.
MAX_CONSECUTIVE_DAMAGED = 1000


class DamagedRecordError(ValueError):
  """A record's bytes do not parse as the format its decoder expects."""


class UnreadableShardsError(RuntimeError):
  """No shard of a set could be opened, or no record of it could be read."""


def unpack_record(data: bytes, fmt: str, version: int, what: str,
                  hint: str = "") -> dict[str, Any]:
  """A msgpack map of format `fmt` written by a version <= `version`.

  Raises DamagedRecordError for bytes that are not msgpack, ValueError for a
  record of another format (`what` names the expected one, e.g. "clip
  record"; `hint` is added to that message) or a newer version: those are not
  damage, and every record would fail alike.
  """
  try:
    record = msgpack.unpackb(data, raw=False)
  except Exception as e:  # pylint: disable=broad-except  # msgpack's errors have no common base
    raise DamagedRecordError(f"not msgpack ({type(e).__name__}: {e})") from e
  if not isinstance(record, dict) or record.get("fmt") != fmt:
    raise ValueError(f"not a phenaki_jax {what}{hint}")
  if record.get("version", 0) > version:
    raise ValueError(f"{what} version {record['version']} is newer than this reader "
                     f"({version}): update phenaki_jax")
  return record


def _open(paths: Sequence[str]) -> Any:
  import grain  # pylint: disable=g-import-not-at-top  # imports jax; readers only
  return grain.sources.ArrayRecordDataSource(list(paths))


class ShardRecords:
  """`records[i]` is `decode(bytes of record i)` over the readable shards.

  Picklable (grain's worker processes each get a copy; each reports the
  damage it meets).
  """

  def __init__(self, paths: Sequence[str], decode: Callable[[bytes], Any], what: str):
    """Opens the shards.

    Args:
      paths: shard files, in reading order.
      decode: bytes -> example; raises DamagedRecordError for bytes that do not
        parse.
      what: what the records are, for messages ("clip", "token").
    """
    self._decode, self._what = decode, what
    readable, lengths, unreadable = [], [], []
    for path in paths:
      try:
        lengths.append(len(_open([path])))
        readable.append(path)
      except Exception as e:  # pylint: disable=broad-except  # array_record raises RuntimeError/ValueError
        unreadable.append((path, e))
    for path, e in unreadable:
      logging.warning("%s shard %s cannot be opened and is left out (%s: %s)", what, path,
                      type(e).__name__, e)
    if not readable:
      raise UnreadableShardsError(
          f"none of the {len(paths)} {what} shard files can be opened: " +
          "; ".join(f"{p}: {type(e).__name__}: {e}" for p, e in unreadable))
    if sum(lengths) == 0:
      raise UnreadableShardsError(f"the {what} shard files hold no records: {readable[:5]}")
    self.paths = readable  # the shard files read: those that could be opened
    self._ends = list(itertools.accumulate(lengths))
    self._source = _open(readable)
    self.damaged: dict[int, str] = {}  # index -> reason, as met by this process

  def __len__(self) -> int:
    return self._ends[-1]

  def where(self, index: int) -> tuple[str, int]:
    """(shard file, position in it) of record `index`."""
    shard = bisect.bisect_right(self._ends, index)
    return self.paths[shard], index - (self._ends[shard - 1] if shard else 0)

  def _try(self, index: int) -> tuple[bool, Any]:
    try:
      return True, self._decode(self._source[index])
    except (RuntimeError, DamagedRecordError) as e:
      if isinstance(e, RuntimeError) and "not found" in str(e).lower():
        self._check_still_there(index, e)
      if index not in self.damaged:
        self.damaged[index] = f"{type(e).__name__}: {e}"
        path, position = self.where(index)
        logging.warning("damaged %s record %d of %s (record %d of the source) skipped: %s "
                        "[%d damaged records met so far]", self._what, position, path, index,
                        self.damaged[index], len(self.damaged))
      return False, None

  def _check_still_there(self, index: int, err: Exception) -> None:
    path, position = self.where(index)
    try:
      there = storage.exists(path)
    except storage.StorageError:
      there = False
    if not there:
      raise UnreadableShardsError(
          f"{self._what} shard {path} is gone (record {position} of it could not be read: "
          f"{type(err).__name__}: {err}); it was there when this run started: was it "
          "deleted or its folder rewritten? Restore it (or prepare the folder again) and "
          "resume the run") from err

  def __getitem__(self, index: int) -> Any:
    index = int(index)
    n = len(self)
    tries = min(n, MAX_CONSECUTIVE_DAMAGED)
    for step in range(tries):
      ok, example = self._try((index + step) % n)
      if ok:
        return example
    path, position = self.where(index)
    raise UnreadableShardsError(
        f"{tries} consecutive {self._what} records from record {position} of {path} are "
        f"damaged: the shards {self.paths[:5]} look unreadable as a whole")

  def __getitems__(self, indices: Sequence[int]) -> list[Any]:
    try:
      # Batched reads let array_record fetch several records per call.
      return [self._decode(d) for d in self._source.__getitems__(list(indices))]
    except (RuntimeError, DamagedRecordError):
      return [self[i] for i in indices]
