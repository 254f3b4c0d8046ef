"""Pre-tokenised shards: the record format, the reader, and the folder's metadata.

Written by the pretokenize job (phenaki_jax/data/pretokenize.py), read by the
generator's input pipeline and trainer. A folder holds video/, image/ and
(built-in data only) eval/ shards of tokens-NNN.array_record and metadata.json.

A record is one msgpack map (no pickle):
  fmt "phenaki_jax/tokens", version, kind, caption,
  codes (bytes, C order), codes_dtype ('int16' when the codebook fits), shape [t, h, w],
  and with a frozen T5: text_embedding (bytes, bfloat16, only the caption's
  real tokens, (n, D)), text_length n.
A trainable text encoder (the built-in byte encoder) cannot be cached: its
records carry the caption, which the trainer tokenises as usual.
"""
from __future__ import annotations

from typing import Any, Sequence

import ml_dtypes
import msgpack
import numpy as np

from phenaki_jax import storage
from phenaki_jax.data import sources
from phenaki_jax.data.shard_records import DamagedRecordError, ShardRecords, unpack_record

RECORD_FORMAT = "phenaki_jax/tokens"
RECORD_VERSION = 1
METADATA = "metadata.json"
SPLITS = ("video", "image", "eval")


# --- The record format.

def encode_token_record(codes: np.ndarray, *, kind: str, caption: str,
                        text_embedding: np.ndarray | None = None) -> bytes:
  """One example's codes (t, h, w) and, optionally, its caption's embeddings (n, D)."""
  codes = np.asarray(codes)
  if codes.ndim != 3:
    raise ValueError(f"codes must be (token frames, h, w); got {codes.shape}")
  dtype = "int16" if codes.max(initial=0) < 2 ** 15 and codes.min(initial=0) >= 0 else "int32"
  record = {"fmt": RECORD_FORMAT, "version": RECORD_VERSION, "kind": kind,
            "caption": str(caption), "shape": list(codes.shape), "codes_dtype": dtype,
            "codes": np.ascontiguousarray(codes.astype(dtype)).tobytes()}
  if text_embedding is not None:
    emb = np.asarray(text_embedding).astype(ml_dtypes.bfloat16)
    record.update(text_embedding=emb.tobytes(), text_length=int(emb.shape[0]),
                  text_width=int(emb.shape[1]))
  return msgpack.packb(record, use_bin_type=True)


def decode_token_record(data: bytes) -> dict[str, Any]:
  """Inverse of `encode_token_record`.

  Raises DamagedRecordError for bytes that do not parse (the reader skips
  those), ValueError for a record of another format or a newer version.
  """
  record = unpack_record(data, RECORD_FORMAT, RECORD_VERSION, "token record",
                         hint=" (was this folder written by configs/pretokenize.py?)")
  try:
    record["codes"] = np.frombuffer(record["codes"], record["codes_dtype"]).reshape(
        record["shape"]).astype(np.int32)
    if "text_embedding" in record:
      record["text_embedding"] = np.frombuffer(
          record["text_embedding"], ml_dtypes.bfloat16).reshape(record["text_length"],
                                                                record["text_width"])
  except (KeyError, TypeError, ValueError) as e:
    raise DamagedRecordError(f"codes or embedding do not decode ({type(e).__name__}: {e})") from e
  return record


class TokenShardSource:
  """Random access to token records: {'codes', 'caption'} (+ 'text_embeddings', 'text_mask').

  Cached embeddings come back padded to `max_length` rows (bfloat16) with a
  bool mask of the real ones, the shapes the trainer's text encoder would
  produce. Picklable for grain's workers.
  """

  def __init__(self, directory: str, split: str, max_length: int):
    self.directory, self.split, self.max_length = directory, split, int(max_length)
    folder = storage.join(directory, split)
    paths = (storage.glob(folder, "*" + sources.SHARD_SUFFIX)
             if storage.isdir(folder) else [])
    if not paths:
      raise FileNotFoundError(f"no {split} token shards in {folder}")
    # Unreadable shard files are left out and damaged records skipped, each
    # reported (phenaki_jax/data/shard_records.py).
    self.records = ShardRecords(paths, self._example, "token")

  def __len__(self) -> int:
    return len(self.records)

  def _example(self, data: bytes) -> dict[str, Any]:
    record = decode_token_record(data)
    out = {"codes": record["codes"], "caption": record["caption"]}
    if "text_embedding" in record:
      emb = record["text_embedding"][:self.max_length]
      padded = np.zeros((self.max_length, emb.shape[1]), ml_dtypes.bfloat16)
      padded[:len(emb)] = emb
      out["text_embeddings"] = padded
      out["text_mask"] = np.arange(self.max_length) < len(emb)
    return out

  def __getitem__(self, index: int) -> dict[str, Any]:
    return self.records[index]

  def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
    return self.records.__getitems__(indices)

  def __repr__(self) -> str:
    return (f"TokenShardSource({self.directory!r}, {self.split!r}, "
            f"{len(self.records.paths)} shards)")


def read_metadata(directory: str) -> dict[str, Any]:
  """A pretokenize output's metadata.json (local or gs://), refused unless complete."""
  path = storage.join(directory, METADATA)
  if not storage.exists(path):
    raise FileNotFoundError(f"{path} is missing: {directory} is not a finished "
                            "configs/pretokenize.py output")
  meta = storage.read_json(path)
  if not meta.get("complete"):
    raise ValueError(f"{directory}: pretokenize did not finish (metadata.json says incomplete); "
                     "run it again")
  return meta
