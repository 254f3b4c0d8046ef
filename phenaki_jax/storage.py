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
import tempfile
from typing import Any, Iterator, Union


PathLike = Union[str, os.PathLike]

REMOTE_SCHEMES = ("gs://",)


class StorageError(OSError):
  """A read, write or listing failed; the message names the path."""


class StorageNotFoundError(StorageError, FileNotFoundError):
  """The path (or its bucket) does not exist."""


def is_remote(path: PathLike) -> bool:
  return os.fspath(path).startswith(REMOTE_SCHEMES)


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


def wrap_error(p: PathLike, doing: str, err: BaseException) -> StorageError:
  """`err` from `doing` `p` as a StorageError naming the path (its bucket if that is gone)."""
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

def _ask(p: PathLike, local_query, remote_method: str) -> bool:
  p = os.fspath(p)
  if not is_remote(p):
    return local_query(p)
  try:
    return getattr(_fs(p), remote_method)(p)
  except Exception as e:  # pylint: disable=broad-except
    raise StorageError(f"checking {p}: {e}") from e


def exists(p: PathLike) -> bool:
  return _ask(p, os.path.exists, "exists")


def isdir(p: PathLike) -> bool:
  return _ask(p, os.path.isdir, "isdir")


def isfile(p: PathLike) -> bool:
  return _ask(p, os.path.isfile, "isfile")


def size(p: PathLike) -> int:
  p = os.fspath(p)
  try:
    if not is_remote(p):
      return os.path.getsize(p)
    return int(_fs(p).info(p)["size"])
  except Exception as e:  # pylint: disable=broad-except
    raise wrap_error(p, "reading the size of", e) from e


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
    raise wrap_error(p, "listing", e) from e


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
    raise wrap_error(folder, f"matching {pattern} in", e) from e


# --- Reads.

def read_bytes(p: PathLike) -> bytes:
  p = os.fspath(p)
  try:
    if not is_remote(p):
      with open(p, "rb") as f:
        return f.read()
    return _fs(p).cat_file(p)
  except Exception as e:  # pylint: disable=broad-except
    raise wrap_error(p, "reading", e) from e


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
    raise wrap_error(p, "opening", e) from e


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
      raise wrap_error(p, "downloading", e) from e
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
      raise wrap_error(p, "downloading", e) from e
    yield local


# --- Writes.

def makedirs(p: PathLike) -> None:
  """A local folder and its parents; on object storage folders need no creating."""
  p = os.fspath(p)
  if is_remote(p):
    return
  try:
    os.makedirs(p, exist_ok=True)
  except Exception as e:  # pylint: disable=broad-except
    raise wrap_error(p, "creating the folder", e) from e


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
    raise wrap_error(p, "writing", e) from e


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
    raise wrap_error(p, "writing", e) from e


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
        raise wrap_error(p, "writing", e) from e
    else:
      upload(tmp, p)
  finally:
    with contextlib.suppress(OSError):
      os.remove(tmp)


class AppendOnlyBytes:
  """A file that only grows (TensorBoard event files; AppendOnlyText's lines).

  Local: appended in place. Object storage has no append: the object is
  rewritten whole from the bytes kept here (read back once on open, so a
  resumed run keeps what an earlier one wrote); each rewrite is one whole
  object, so a reader never sees a torn record. `size`: the bytes so far.
  """

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
        raise wrap_error(self.path, "appending to", e) from e
    self.size += len(data)

  def replace(self, data: bytes) -> None:
    """Rewrites the whole file (e.g. a resumed run dropping rows past its step)."""
    write_bytes(self.path, data)
    self._data = data if self._remote else b""
    self.size = len(data)


class AppendOnlyText(AppendOnlyBytes):
  """AppendOnlyBytes for UTF-8 lines (metrics.jsonl, batch hashes)."""

  def append(self, text: str) -> None:  # pytype: disable=signature-mismatch
    super().append(text.encode("utf-8"))

  def replace(self, text: str) -> None:  # pytype: disable=signature-mismatch
    super().replace(text.encode("utf-8"))


# --- Removing and moving.

def remove(p: PathLike) -> None:
  p = os.fspath(p)
  try:
    if is_remote(p):
      _fs(p).rm_file(p)
    else:
      os.remove(p)
  except Exception as e:  # pylint: disable=broad-except
    raise wrap_error(p, "removing", e) from e


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
    raise wrap_error(p, "removing", e) from e


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
    raise wrap_error(src, f"moving to {dst}:", e) from e


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
