"""grain random-access sources of `{"frames", "caption"}` examples.

`ClipShardSource` reads the clip shards written by `prepare.py`;
`TfdsClipSource` reads a TFDS dataset prepared in ArrayRecord format.

This module also holds the clip record format, which prepare and the reader
share. A record is one msgpack map (language-neutral, no pickle):

  fmt         "phenaki_jax/clip"
  version     RECORD_VERSION; readers refuse newer records
  kind        "video" or "image"
  caption     str
  source      path of the source file
  line        1-based line of the source in its manifest
  start_time  seconds from the source's first frame to the clip's first
  fps         frame rate of the clip (0.0 for images)
  shape       [T, H, W, 3]
  codec       how `frames` holds the uint8 RGB pixels:
                "raw":  one bytes string, C order (the shard applies zstd)
                "png" / "jpeg": a list of T per-frame files
  frames      see codec

Why these codecs (and which is default) is measured in `prepare.py`.
"""

from __future__ import annotations

import io
import os
from typing import Any, Sequence

from absl import logging
import msgpack  # flax's serialisation dependency; plain maps suffice here.
import numpy as np
from PIL import Image

from phenaki_jax import storage
from phenaki_jax.data.shard_records import DamagedRecordError, ShardRecords, unpack_record

RECORD_FORMAT = "phenaki_jax/clip"
RECORD_VERSION = 1
FRAME_CODECS = ("raw", "png", "jpeg")
KINDS = ("video", "image")
SHARD_SUFFIX = ".array_record"


def encode_clip_record(frames: np.ndarray, *, kind: str, caption: str,
                       source: str, line: int = 0, start_time: float = 0.0,
                       fps: float = 0.0, codec: str = "raw",
                       jpeg_quality: int = 95) -> bytes:
  """Serialises one clip (uint8 `[T, H, W, 3]`) and its text as a record."""
  frames = np.asarray(frames)
  if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
    raise ValueError(f"frames must be uint8 [T, H, W, 3], got "
                     f"{frames.dtype} {frames.shape}")
  if kind not in KINDS:
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
  if codec == "raw":
    payload = np.ascontiguousarray(frames).tobytes()
  elif codec in ("png", "jpeg"):
    payload = [_encode_image(f, codec, jpeg_quality) for f in frames]
  else:
    raise ValueError(f"codec must be one of {FRAME_CODECS}, got {codec!r}")
  return msgpack.packb({
      "fmt": RECORD_FORMAT, "version": RECORD_VERSION, "kind": kind,
      "caption": str(caption), "source": str(source), "line": int(line),
      "start_time": float(start_time), "fps": float(fps),
      "shape": list(frames.shape), "codec": codec, "frames": payload,
  }, use_bin_type=True)


def _encode_image(frame: np.ndarray, codec: str, quality: int) -> bytes:
  buf = io.BytesIO()
  if codec == "png":
    # Level 1: measured ~3% larger than level 6 but 1.5-3x faster to write.
    Image.fromarray(frame).save(buf, format="PNG", compress_level=1)
  else:
    Image.fromarray(frame).save(buf, format="JPEG", quality=quality)
  return buf.getvalue()


def decode_clip_record(data: bytes) -> dict[str, Any]:
  """Inverse of `encode_clip_record`: a dict with `frames` as uint8 array.

  Raises DamagedRecordError for bytes that do not parse (the reader skips
  those), ValueError for a record of another format or a newer version.
  """
  record = unpack_record(data, RECORD_FORMAT, RECORD_VERSION, "clip record")
  codec = record.get("codec")
  if codec not in FRAME_CODECS:
    raise DamagedRecordError(f"unknown frame codec {codec!r}")
  try:
    shape = tuple(record["shape"])
    if codec == "raw":
      # Copy: a view of the message bytes would be read-only.
      frames = np.frombuffer(record["frames"], np.uint8).reshape(shape).copy()
    else:
      frames = np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB"))
                         for b in record["frames"]])
      if frames.shape != shape:
        raise ValueError(f"frames decode to {frames.shape}, the record says {shape}")
  except (KeyError, TypeError, ValueError, OSError) as e:  # PIL raises OSError subclasses
    raise DamagedRecordError(f"frames do not decode ({type(e).__name__}: {e})") from e
  record["frames"] = frames
  return record


# ----------------------------------------------------------------------------
# Finding shards.


SPLITS = ("train", "eval")


def is_prepared_dir(path: str) -> bool:
  """Whether `path` is a `prepare` output folder (it has metadata.json)."""
  return storage.isdir(path) and storage.exists(storage.join(path, "metadata.json"))


def find_prepared_shards(prepared_dir: str, split: str = "train") -> dict[str, list[str]]:
  """The video and image shard files of a `prepare` output (local or gs://), in order.

  Once prepare has finished (every worker, see prepare.py) its summary.json
  lists the whole shard set, and exactly those files are returned, so a
  reader never mixes in a stray file; before that, the shards written so
  far, with a warning.

  Args:
    split: "train" (video/, image/) or "eval": the evaluation split prepare
      writes beside them (eval/video/, eval/image/; prepare.py eval_fraction).
      A folder prepared without one has no eval shards.

  Returns:
    {"video": [...], "image": [...]}, each sorted (= manifest order); a kind
    with no records has an empty list.
  """
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  prepared_dir = os.fspath(prepared_dir)
  if not storage.isdir(prepared_dir):
    raise FileNotFoundError(f"no prepared data directory at {prepared_dir}")
  summary_path = storage.join(prepared_dir, "summary.json")
  summary = storage.read_json(summary_path) if storage.exists(summary_path) else {}
  listed = "shards" if split == "train" else "eval_shards"
  if summary.get("complete") and "shards" in summary:
    return {kind: sorted(storage.join(prepared_dir, s["file"])
                         for s in summary.get(listed, {}).get(kind, []))
            for kind in KINDS}
  logging.warning("%s: prepare has not finished (no complete summary.json);"
                  " reading the shards written so far.", prepared_dir)
  prefix = "" if split == "train" else "eval/"
  return {kind: _shards_in(storage.join(prepared_dir, prefix + kind)) for kind in KINDS}


def _shards_in(folder: str) -> list[str]:
  """The shard files directly in `folder` (none if it does not exist)."""
  if not storage.isdir(folder):
    return []
  return storage.glob(folder, "*" + SHARD_SUFFIX)


def _expand(pattern: str) -> list[str]:
  """Paths matching a glob (wildcards from the first component that has one)."""
  parts = pattern.split("/")
  first = next(i for i, part in enumerate(parts) if any(c in part for c in "*?["))
  folder = "/".join(parts[:first]) or ("/" if pattern.startswith("/") else ".")
  if not storage.isdir(folder):
    return []
  return storage.glob(folder, "/".join(parts[first:]))


def _missing(paths: Sequence[str]) -> list[str]:
  """The paths that are not there: one listing per folder, not a request per
  file (thousands of shards in a bucket)."""
  present: dict[str, set[str]] = {}
  missing = []
  for p in paths:
    folder = storage.dirname(p) or "."
    if folder not in present:
      present[folder] = set(storage.listdir(folder)) if storage.isdir(folder) else set()
    if storage.basename(p) not in present[folder]:
      missing.append(p)
  return missing


def _resolve_paths(paths_or_dir: str | os.PathLike | Sequence[str],
                   kind: str | None) -> list[str]:
  if isinstance(paths_or_dir, (str, os.PathLike)):
    path = os.fspath(paths_or_dir)
    if storage.isdir(path):
      shards = _shards_in(path)
      if shards:
        return shards
      found = find_prepared_shards(path)
      if kind is None:
        nonempty = [k for k in KINDS if found[k]]
        if len(nonempty) > 1:
          raise ValueError(f"{path} holds both video and image shards: pass "
                           "kind='video' or kind='image'")
        kind = nonempty[0] if nonempty else "video"
      if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
      paths = found[kind]
    elif any(c in path for c in "*?["):
      paths = _expand(path)
    else:
      paths = [path]
  else:
    paths = [os.fspath(p) for p in paths_or_dir]
  if not paths:
    raise FileNotFoundError(f"no {kind or ''} shards found at {paths_or_dir}")
  missing = _missing(paths)
  if missing:
    raise FileNotFoundError(f"shard files not found: {missing[:5]}")
  return paths


class ClipShardSource:
  """Random access to clips in ArrayRecord shards written by `prepare`.

  `source[i]` is `{"frames": uint8 [T, H, W, 3], "caption": str}` (plus
  `source`, `start_time` and `kind` with `with_metadata=True`). Picklable, so
  it works with grain's multiprocess loading.
  """

  def __init__(self, paths_or_dir: str | os.PathLike | Sequence[str], *,
               kind: str | None = None, with_metadata: bool = False):
    """Opens shards.

    Args:
      paths_or_dir: shard files, a glob, a shard folder (`OUT/video`), or a
        prepare output folder (then `kind` picks the shard set when it holds
        both).
      kind: "video" or "image", for a prepare output folder.
      with_metadata: also return source path, start time and kind.
    """
    self._with_metadata = with_metadata
    # Unreadable shard files are left out and damaged records skipped, each
    # reported (phenaki_jax/data/shard_records.py).
    self.records = ShardRecords(_resolve_paths(paths_or_dir, kind), self._example, "clip")

  @property
  def paths(self) -> list[str]:
    """The shard files read (those that could be opened)."""
    return list(self.records.paths)

  def __len__(self) -> int:
    return len(self.records)

  def _example(self, data: bytes) -> dict[str, Any]:
    record = decode_clip_record(data)
    example = {"frames": record["frames"], "caption": record["caption"]}
    if self._with_metadata:
      example.update(source=record["source"],
                     start_time=np.float32(record["start_time"]),
                     kind=record["kind"])
    return example

  def __getitem__(self, index: int) -> dict[str, Any]:
    return self.records[index]

  def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
    return self.records.__getitems__(indices)

  def __repr__(self) -> str:
    return (f"ClipShardSource({len(self.records.paths)} shards, first="
            f"{self.records.paths[0]!r})")


# ----------------------------------------------------------------------------
# TFDS datasets.


def _lookup(example: dict[str, Any], key: str) -> Any:
  """`example["a"]["b"]` for key "a/b" (TFDS nests FeaturesDicts)."""
  value = example
  for part in key.split("/"):
    value = value[part]
  return value


def _as_clip(frames: Any, key: str) -> np.ndarray:
  if isinstance(frames, (list, tuple)):  # numpy-decoded Video: per frame
    frames = np.stack(frames)
  frames = np.asarray(frames)
  if frames.ndim == 3:  # an Image feature: a 1-frame clip
    frames = frames[None]
  if frames.ndim != 4 or frames.shape[-1] not in (1, 3):
    raise ValueError(f"feature {key!r} is not [T, H, W, C<=3] video or "
                     f"[H, W, C] image: shape {frames.shape}")
  if frames.dtype != np.uint8:
    raise ValueError(f"feature {key!r} has dtype {frames.dtype}, not uint8")
  if frames.shape[-1] == 1:
    frames = np.repeat(frames, 3, axis=-1)
  return frames


class TfdsClipSource:
  """`{"frames", "caption"}` examples from a TFDS dataset.

  Reads through `tfds.data_source`: random access and grain-ready, but only
  for datasets prepared in ArrayRecord format (and without TensorFlow only
  that works at all). Image features come out as 1-frame clips, grey ones
  with 3 channels. Picklable.
  """

  def __init__(self, name: str, *, split: str = "train",
               data_dir: str | None = None, frames_key: str = "video",
               caption_key: str = "caption"):
    """Opens a prepared TFDS dataset.

    Args:
      name: TFDS name, e.g. "my_clips" or "my_clips/config:1.0.0", or the
        prepared version's folder (`DATA_DIR/my_clips/1.0.0`), which needs
        no builder code.
      split: split (slicing allowed: "train[:90%]").
      data_dir: where the dataset was prepared.
      frames_key: feature with the frames; "/" goes into nested dicts.
      caption_key: text feature with the caption.
    """
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    if storage.isdir(name):
      builder = tfds.builder_from_directory(name)
      self._source = builder.as_data_source(split=split)
    else:
      self._source = tfds.data_source(name, split=split, data_dir=data_dir)
    self._frames_key = frames_key
    self._caption_key = caption_key

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    example = self._source[index]
    caption = _lookup(example, self._caption_key)
    if isinstance(caption, bytes):
      caption = caption.decode("utf-8")
    return {"frames": _as_clip(_lookup(example, self._frames_key),
                               self._frames_key),
            "caption": str(caption)}
