"""One path layer: every path a user can give may be local or `gs://`.

Paths travel through the code as strings; this module is the one place that
touches them (etils `epath`, the layer Orbax already writes checkpoints
through, so checkpoints and everything else reach a bucket by the same client
and the same credentials / emulator settings).

`gs://` goes through fsspec's gcsfs, never TensorFlow's GCS client: gcsfs
honours `STORAGE_EMULATOR_HOST` (tests run against a real emulator) and is
what epath uses on machines without TensorFlow, e.g. most TPU VMs. We set
`EPATH_USE_TF=false` when the package is imported (phenaki_jax/__init__.py);
a user who sets it themselves keeps their choice.

Atomicity. A local write goes to a temporary name in the same folder and is
renamed over the target, so a reader sees the old file or the whole new one.
On object storage an object becomes visible only when its upload is
finalised, whole, so there a write goes straight to its final name (renaming
an object is a copy, not atomic, and buys nothing). Every error names the path.
"""
from __future__ import annotations

import contextlib
import fnmatch
import glob as _glob
import json
import os
import posixpath
import shutil
import struct
import tempfile
from typing import Any, Iterator, Union

from etils import epath

PathLike = Union[str, os.PathLike]

REMOTE_SCHEMES = ("gs://",)


class StorageError(OSError):
  """A read, write or listing failed; the message names the path."""


class StorageNotFoundError(StorageError, FileNotFoundError):
  """The path (or its bucket) does not exist."""


def is_remote(path: PathLike) -> bool:
  return os.fspath(path).startswith(REMOTE_SCHEMES)


def path(p: PathLike) -> epath.Path:
  return epath.Path(os.fspath(p))


def _fs(p: str):
  """The fsspec filesystem behind a remote path, its listing cache dropped.

  gcsfs caches listings per process; another process (or host) may have
  written since, and a stale "not there" must not win.
  """
  from etils.epath import backend as epath_backend  # pylint: disable=g-import-not-at-top
  fs = epath_backend.fsspec_backend.fs(p)
  fs.invalidate_cache()
  return fs


def _bucket(p: str) -> str:
  return "gs://" + p[len("gs://"):].split("/", 1)[0]


def _wrap(p: PathLike, doing: str, err: BaseException) -> StorageError:
  p = os.fspath(p)
  text = str(err) or type(err).__name__
  missing = isinstance(err, FileNotFoundError) or "404" in text or "does not exist" in text
  if is_remote(p) and missing and not exists(_bucket(p)):
    return StorageNotFoundError(f"{doing} {p}: bucket {_bucket(p)} does not exist")
  cls = StorageNotFoundError if missing else StorageError
  return cls(f"{doing} {p}: {text}")


# --- Names (pure string operations: `os.path` would fold gs:// into gs:/).

def join(base: PathLike, *parts: str) -> str:
  base = os.fspath(base)
  if is_remote(base):
    return posixpath.join(base, *parts)
  return os.path.join(base, *parts)


def dirname(p: PathLike) -> str:
  p = os.fspath(p).rstrip("/")
  if is_remote(p):
    head = posixpath.dirname(p)
    return head if len(head) > len("gs:/") else p
  return os.path.dirname(p)


def basename(p: PathLike) -> str:
  return posixpath.basename(os.fspath(p).rstrip("/"))


def splitext(p: PathLike) -> tuple[str, str]:
  return posixpath.splitext(os.fspath(p))


def absolute(p: PathLike) -> str:
  """A local path made absolute (as recorded in run files); remote unchanged."""
  p = os.fspath(p)
  return p if is_remote(p) else os.path.abspath(p)


def resolve(base: PathLike, rel: PathLike) -> str:
  """`rel` taken relative to the folder `base`, normalised ('a/../b' -> 'b').

  A remote or absolute `rel` stays itself and `~` expands (both local
  paths), so a manifest in a bucket may list `gs://` objects, bucket-relative
  names, or files on the reading machine.
  """
  base, rel = os.fspath(base), os.fspath(rel)
  if is_remote(rel):
    return rel
  rel = os.path.expanduser(rel)
  if not is_remote(base) or os.path.isabs(rel):
    return os.path.normpath(os.path.join(base, rel))
  bucket, _, inside = base[len("gs://"):].partition("/")
  inside = posixpath.normpath(posixpath.join(inside, rel))
  if inside == ".." or inside.startswith("../"):
    raise ValueError(f"{rel} reaches above the bucket of {base}")
  return f"gs://{bucket}" + ("" if inside == "." else "/" + inside)


# --- Queries.

def exists(p: PathLike) -> bool:
  p = os.fspath(p)
  if not is_remote(p):
    return os.path.exists(p)
  try:
    return _fs(p).exists(p)
  except Exception as e:  # pylint: disable=broad-except
    raise StorageError(f"checking {p}: {e}") from e


def isdir(p: PathLike) -> bool:
  p = os.fspath(p)
  if not is_remote(p):
    return os.path.isdir(p)
  try:
    return _fs(p).isdir(p)
  except Exception as e:  # pylint: disable=broad-except
    raise StorageError(f"checking {p}: {e}") from e


def isfile(p: PathLike) -> bool:
  p = os.fspath(p)
  if not is_remote(p):
    return os.path.isfile(p)
  try:
    return _fs(p).isfile(p)
  except Exception as e:  # pylint: disable=broad-except
    raise StorageError(f"checking {p}: {e}") from e


def size(p: PathLike) -> int:
  p = os.fspath(p)
  try:
    if not is_remote(p):
      return os.path.getsize(p)
    return int(_fs(p).info(p)["size"])
  except Exception as e:  # pylint: disable=broad-except
    raise _wrap(p, "reading the size of", e) from e


def listdir(p: PathLike) -> list[str]:
  """Sorted names in a folder; raises StorageNotFoundError naming it if absent."""
  p = os.fspath(p)
  try:
    if not is_remote(p):
      return sorted(os.listdir(p))
    fs = _fs(p)
    if not fs.isdir(p):
      raise FileNotFoundError("no such folder")
    names = [posixpath.basename(x.rstrip("/")) for x in fs.ls(p, detail=False)]
    return sorted(n for n in names if n)
  except StorageError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise _wrap(p, "listing", e) from e


def glob(folder: PathLike, pattern: str) -> list[str]:
  """Sorted full paths of the entries of `folder` whose names match `pattern`.

  A pattern with '/' matches deeper entries ('*/story.json'); a missing
  folder then matches nothing.
  """
  if "/" not in pattern:
    return [join(folder, n) for n in listdir(folder) if fnmatch.fnmatch(n, pattern)]
  folder = os.fspath(folder).rstrip("/") or "/"
  full = join(folder, pattern)
  try:
    if not is_remote(full):
      return sorted(_glob.glob(full))
    return sorted("gs://" + m.rstrip("/") for m in _fs(full).glob(full))
  except Exception as e:  # pylint: disable=broad-except
    raise _wrap(folder, f"matching {pattern} in", e) from e


# --- Reads.

def read_bytes(p: PathLike) -> bytes:
  p = os.fspath(p)
  try:
    if not is_remote(p):
      with open(p, "rb") as f:
        return f.read()
    return _fs(p).cat_file(p)
  except Exception as e:  # pylint: disable=broad-except
    raise _wrap(p, "reading", e) from e


def read_text(p: PathLike) -> str:
  return read_bytes(p).decode("utf-8")


def read_json(p: PathLike) -> Any:
  text = read_text(p)
  try:
    return json.loads(text)
  except json.JSONDecodeError as e:
    raise StorageError(f"reading {os.fspath(p)}: not valid JSON ({e})") from e


def open_file(p: PathLike, mode: str = "rb"):
  """A file object (for readers that stream: video decoders, PIL, numpy)."""
  p = os.fspath(p)
  if any(c in mode for c in "wax+"):
    raise ValueError(f"open_file is for reading; write {p} with write_bytes / write_text")
  try:
    if not is_remote(p):
      return open(p, mode)
    return _fs(p).open(p, mode)
  except Exception as e:  # pylint: disable=broad-except
    raise _wrap(p, "opening", e) from e


@contextlib.contextmanager
def local_copy(p: PathLike) -> Iterator[str]:
  """A local path with `p`'s bytes: itself if local, else a temporary download.

  For readers that need a real file name (SentencePiece, safetensors' mmap).
  """
  p = os.fspath(p)
  if not is_remote(p):
    yield p
    return
  with tempfile.TemporaryDirectory(prefix="phenaki_jax_") as tmp:
    local = os.path.join(tmp, basename(p))
    try:
      _fs(p).get_file(p, local)
    except Exception as e:  # pylint: disable=broad-except
      raise _wrap(p, "downloading", e) from e
    yield local


@contextlib.contextmanager
def local_folder_copy(p: PathLike) -> Iterator[str]:
  """A local folder with `p`'s files (recursively), for the same readers."""
  p = os.fspath(p)
  if not is_remote(p):
    yield p
    return
  with tempfile.TemporaryDirectory(prefix="phenaki_jax_") as tmp:
    local = os.path.join(tmp, basename(p))
    try:
      if not _fs(p).isdir(p):
        raise FileNotFoundError("no such folder")
      _fs(p).get(p.rstrip("/") + "/", local, recursive=True)
    except Exception as e:  # pylint: disable=broad-except
      raise _wrap(p, "downloading", e) from e
    yield local


class SafetensorsReader:
  """The tensors of a .safetensors file: keys(), shape(key), get_tensor(key) -> numpy.

  Local files are memory-mapped by `safetensors` itself. A remote file is not
  downloaded: its header is read, then each tensor asked for by a ranged
  read, so a T5ForConditionalGeneration checkpoint costs no transfer for its
  decoder.
  """

  def __init__(self, p: PathLike):
    self.path = os.fspath(p)
    self._handle = self._file = None
    if not is_remote(self.path):
      from safetensors import safe_open  # pylint: disable=g-import-not-at-top
      if not os.path.isfile(self.path):
        raise StorageNotFoundError(f"reading {self.path}: no such file")
      self._handle = safe_open(self.path, framework="np")
      return
    self._file = open_file(self.path, "rb")
    try:
      n = struct.unpack("<Q", self._file.read(8))[0]
      if not 2 <= n <= 1 << 30:
        raise ValueError(f"header length {n}")
      header = json.loads(self._file.read(n))
    except Exception as e:  # pylint: disable=broad-except
      self.close()
      raise StorageError(f"reading {self.path}: not a safetensors file ({e})") from e
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
      raise _wrap(self.path, f"reading tensor {key} of", e) from e
    if len(data) != end - begin:
      raise StorageError(f"reading {self.path}: tensor {key} is cut short")
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
    raise StorageError(f"reading {p}: unsupported safetensors dtype {name}")
  return np.dtype(dtypes[name]).newbyteorder("<")


# --- Writes.

def makedirs(p: PathLike) -> None:
  """A local folder and its parents; on object storage folders need no creating."""
  p = os.fspath(p)
  if is_remote(p):
    return
  try:
    os.makedirs(p, exist_ok=True)
  except Exception as e:  # pylint: disable=broad-except
    raise _wrap(p, "creating the folder", e) from e


def write_bytes(p: PathLike, data: bytes) -> None:
  """Writes `p` whole: a reader sees the old content or all of the new (see top)."""
  p = os.fspath(p)
  try:
    if is_remote(p):
      _fs(p).pipe_file(p, data)
      return
    folder = os.path.dirname(p) or "."
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(p) + ".", suffix=".tmp", dir=folder)
    try:
      with os.fdopen(fd, "wb") as f:
        f.write(data)
      os.replace(tmp, p)
    except BaseException:
      with contextlib.suppress(OSError):
        os.remove(tmp)
      raise
  except Exception as e:  # pylint: disable=broad-except
    raise _wrap(p, "writing", e) from e


def write_text(p: PathLike, text: str) -> None:
  write_bytes(p, text.encode("utf-8"))


def write_json(p: PathLike, obj: Any, indent: int | None = 2) -> None:
  write_text(p, json.dumps(obj, indent=indent, sort_keys=indent is not None) + "\n")


def upload(local: str, p: PathLike) -> None:
  """Copies the local file `local` to `p` whole (atomic as write_bytes)."""
  p = os.fspath(p)
  try:
    if is_remote(p):
      _fs(p).put_file(local, p)
      return
    folder = os.path.dirname(p) or "."
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(p)}.{os.getpid()}.tmp")
    shutil.copyfile(local, tmp)
    os.replace(tmp, p)
  except Exception as e:  # pylint: disable=broad-except
    raise _wrap(p, "writing", e) from e


@contextlib.contextmanager
def staged_file(p: PathLike, suffix: str = "") -> Iterator[str]:
  """A local temporary file for a writer that needs a real file name (ArrayRecord,
  an mp4 encoder); it is moved or uploaded to `p` whole only if the block ends
  without an error, so `p` never holds half a file."""
  p = os.fspath(p)
  folder = None if is_remote(p) else (os.path.dirname(p) or ".")
  if folder is not None:
    makedirs(folder)
  # The name ends with `suffix`: encoders pick the container from the extension.
  fd, tmp = tempfile.mkstemp(prefix="." + basename(p) + ".", suffix=".tmp" + suffix, dir=folder)
  os.close(fd)
  try:
    yield tmp
    if folder is not None:
      try:
        os.replace(tmp, p)
      except Exception as e:  # pylint: disable=broad-except
        raise _wrap(p, "writing", e) from e
    else:
      upload(tmp, p)
  finally:
    with contextlib.suppress(OSError):
      os.remove(tmp)


class AppendOnlyText:
  """A text file that grows by lines (metrics.jsonl, batch hashes).

  Local: appended in place. Object storage has no append: the object is
  rewritten whole from the lines kept here (read back once on open, so a
  resumed run keeps what an earlier one wrote); each rewrite is one whole
  object, so a reader never sees a torn line.
  """

  def __init__(self, p: PathLike):
    self.path = os.fspath(p)
    self._remote = is_remote(self.path)
    self._text = None
    if self._remote:
      self._text = read_text(self.path) if exists(self.path) else ""
    else:
      makedirs(os.path.dirname(self.path) or ".")

  def append(self, text: str) -> None:
    if self._remote:
      self._text += text
      write_text(self.path, self._text)
      return
    try:
      with open(self.path, "a") as f:
        f.write(text)
    except Exception as e:  # pylint: disable=broad-except
      raise _wrap(self.path, "appending to", e) from e

  def replace(self, text: str) -> None:
    """Rewrites the whole file (e.g. a resumed run dropping rows past its step)."""
    self._text = text if self._remote else None
    write_text(self.path, text)


class AppendOnlyBytes:
  """AppendOnlyText's binary twin (TensorBoard event files): appended in place
  locally, rewritten whole on object storage. `size`: the bytes written so far."""

  def __init__(self, p: PathLike):
    self.path = os.fspath(p)
    self._remote = is_remote(self.path)
    self._data = b""
    if self._remote:
      self._data = read_bytes(self.path) if exists(self.path) else b""
      self.size = len(self._data)
    else:
      makedirs(os.path.dirname(self.path) or ".")
      self.size = os.path.getsize(self.path) if os.path.exists(self.path) else 0

  def append(self, data: bytes) -> None:
    if self._remote:
      self._data += data
      write_bytes(self.path, self._data)
    else:
      try:
        with open(self.path, "ab") as f:
          f.write(data)
      except Exception as e:  # pylint: disable=broad-except
        raise _wrap(self.path, "appending to", e) from e
    self.size += len(data)


# --- Removing and moving.

def remove(p: PathLike) -> None:
  p = os.fspath(p)
  try:
    if is_remote(p):
      _fs(p).rm_file(p)
    else:
      os.remove(p)
  except Exception as e:  # pylint: disable=broad-except
    raise _wrap(p, "removing", e) from e


def rmtree(p: PathLike) -> None:
  p = os.fspath(p)
  try:
    if is_remote(p):
      fs = _fs(p)
      if fs.exists(p):
        fs.rm(p, recursive=True)
    elif os.path.exists(p):
      shutil.rmtree(p)
  except Exception as e:  # pylint: disable=broad-except
    raise _wrap(p, "removing", e) from e


def rename(src: PathLike, dst: PathLike) -> None:
  """Moves a file or folder. Atomic locally; on object storage a copy then a
  delete, object by object (used only to set things aside, never to publish)."""
  src, dst = os.fspath(src), os.fspath(dst)
  try:
    if is_remote(src) or is_remote(dst):
      if is_remote(src) != is_remote(dst):
        raise ValueError("cannot move between local and remote storage")
      # copy + delete ourselves: gcsfs's mv tries a server-side move first that
      # not every GCS-protocol server (the test emulator) implements.
      fs = _fs(src)
      fs.copy(src.rstrip("/"), dst.rstrip("/"), recursive=True)
      fs.rm(src.rstrip("/"), recursive=True)
    else:
      os.replace(src, dst)
  except Exception as e:  # pylint: disable=broad-except
    raise _wrap(src, f"moving to {dst}:", e) from e


def check_writable_root(p: PathLike, what: str) -> None:
  """Fails early, naming `what` (a config key or flag), if a remote path's bucket
  does not exist; local folders are created."""
  p = os.fspath(p)
  if not is_remote(p):
    makedirs(p)
    return
  bucket = _bucket(p)
  if not exists(bucket):
    raise StorageNotFoundError(f"{what}={p}: bucket {bucket} does not exist "
                               "(or these credentials cannot see it)")
