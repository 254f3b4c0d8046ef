"""Turns a manifest of videos/images with captions into ArrayRecord shards.

    python -m phenaki_jax.data.prepare --manifest=captions.jsonl --out=DIR \
        [--config.resolution=128 --config.num_workers=8 ...]

or `main.py --config=configs/prepare.py --workdir=DIR` (calls `run`).

Manifests: JSONL (`{"path": ..., "caption": ...}` a line) or CSV/TSV with
configurable column names; `path_format` builds paths from several columns
(WebVid: `{page_dir}/{videoid}.mp4`). Relative paths resolve against the
manifest's folder (or `media_root`). A path with an image extension is an
image-text pair, anything else a video. The manifest, the media, `media_root`
and DIR may each be local or `gs://` (phenaki_jax/storage.py); a manifest in a
bucket may list bucket-relative names or `gs://` objects.

Output (DIR):
  metadata.json          settings, manifest hash, record format version
  video/video-UUUUU-PPP.array_record   clips of work unit U, part P
  image/image-UUUUU-PPP.array_record   1-frame (or still) image clips
  eval/video/..., eval/image/...       the evaluation split, named alike
  units/unit-UUUUU.json  a finished unit's report; its existence = "done"
  workers/worker-IIIII-of-NNNNN.json   worker I's report: its units' reports
  summary.json           the merged report: counts, every shard, every
                         skipped file with its reason, the evaluation split
                         (`eval_split`, `eval_shards`); `complete` once every
                         unit of the manifest is done

The evaluation split. A file is held out when `eval_key` of its path (as
the manifest gives it, relative to media_root) is below `eval_fraction`:
a fixed hash of the name alone, so every clip of one video is on the same
side, any worker (and any engine, `process_unit`) decides alike, and a
manifest that grows keeps its old files where they were. Held-out files'
clips go to `eval/<kind>/` only; `shards` in the summary are the training
shards, `eval_shards` the others, and the top-level counts cover both
(`eval_split` has the held-out part and the files in it). Readers:
sources.find_prepared_shards(DIR, split="eval"); the trainers evaluate on
it (data/pipeline.py eval_source).

Work is cut into deterministic units of `files_per_unit` manifest entries.
Each unit writes its shards (at most `clips_per_shard` records each) to a
temporary file, publishes each whole (a rename, or one object upload), then
writes its report. A re-run with the same settings and manifest skips
finished units and redoes any other unit from scratch (removing its
leftovers first), so a killed run resumes without duplicates or losses. A unit
that produced no record of a kind writes no shard of that kind. Bad inputs
(missing, empty, not a video, truncated, corrupted, too short, undecodable
image, bad manifest row) are skipped, each logged and listed in summary.json
with a reason that names the file.

Several machines. With `worker_count=N`, unit U belongs to worker
`U % N`; worker `worker_index=I` does only its own units, so N machines (or
N runs on one) prepare one manifest into ONE folder (local, shared, or gs://)
with no unit done twice: every name a worker writes is its units' own. Each
worker resumes on its own (re-running worker I redoes only its unfinished
units) and ends by writing its report; the worker that finds all N reports
complete writes summary.json, merged from them (`merge_only=True` re-merges,
also partially, without decoding anything). Until then there is no
summary.json (with N > 1) and readers (sources.find_prepared_shards) warn
that the set is partial; once it exists they read exactly the shards it lists.

Record format (see `sources.py` for the fields). Measured 2026-11-22 on the
project's 2-core CPU machine (shared: load ~3.5, so speeds are the range of
three best-of-3 runs) with the 30 clips of 11 frames cut from the five videos
in shared/data/real/videos. Size: file size / records over 300 records
(ArrayRecord pads files to 64 KiB blocks). Read: grain ArrayRecordDataSource
in random order, msgpack + decode to uint8 arrays, one process.

  64x64 (raw clip 132 KiB)       KiB/clip  read clips/s    PSNR dB
    raw, uncompressed               132.5   17,300-23,500   lossless
    raw, array_record zstd:3        100.3    6,000-6,800    lossless
    PNG per frame (level 1)          82.3      360-430      lossless
    JPEG per frame (q95)             32.6      490-750      37.1
    JPEG per frame (q90)             25.6      460-1,200    34.6
    mp4 per clip (x264 crf 18)        9.0       70-160      34.4
  128x128 (raw clip 528 KiB)
    raw, uncompressed               528.6    4,750-6,600    lossless
    raw, array_record zstd:3        361.8    1,650-2,050    lossless
    PNG per frame (level 1)         275.0      110-150      lossless
    JPEG per frame (q95)             83.6      320-550      40.5
    mp4 per clip (x264 crf 18)       22.4       40-60       36.9

Default `frame_codec="raw"` (zstd inside ArrayRecord): lossless, so the
tokenizer sees exactly what the decoder produced (the sources are already
lossy once), 24-32% smaller than raw, thousands of clips/s per core. PNG
saves 18-24% more but reads >10x slower. `frame_codec="jpeg"` (q95) is the
option for large corpora: 3-4x smaller than zstd at 37-40 dB, still hundreds
of clips/s per core, far ahead of a training step here. Per-clip mp4 is the
smallest but the slowest to read, and is not offered.
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import fcntl
import hashlib
import io
import json
import multiprocessing
import os
import re
import sys
import time
from typing import Any, Iterator

from absl import logging
import ml_collections
import tqdm

from phenaki_jax import storage
from phenaki_jax.config import prepare as prepare_config
from phenaki_jax.data import shard_writer, sources
from phenaki_jax.data import video_io

METADATA_FORMAT = "phenaki_jax/clip_shards"
_JSONL_EXTENSIONS = (".jsonl", ".json", ".ndjson")
_CSV_EXTENSIONS = (".csv", ".tsv")
BAD_MANIFEST_ENTRY = "bad_manifest_entry"
UNEXPECTED_ERROR = "error"
# Concurrent small reads (reports) from a bucket: latency-bound, not CPU-bound.
_REMOTE_READ_THREADS = 16


def default_config() -> ml_collections.ConfigDict:
  """Settings of `run` (phenaki_jax/config/prepare.py); configs/prepare.py starts from these."""
  return prepare_config.defaults()


@dataclasses.dataclass(frozen=True)
class Settings:
  """What determines the bytes written; a resumed run (and every worker) must match them."""
  resolution: int
  num_frames: int
  fps: float
  clip_stride_frames: int
  max_clips_per_video: int
  image_num_frames: int
  frame_codec: str
  jpeg_quality: int
  clips_per_shard: int
  files_per_unit: int
  eval_fraction: float = 0.0

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> Settings:
    s = cls(
        resolution=int(config.resolution), num_frames=int(config.num_frames),
        fps=float(config.fps),
        clip_stride_frames=int(config.clip_stride_frames or config.num_frames),
        max_clips_per_video=int(config.max_clips_per_video),
        image_num_frames=int(config.image_num_frames),
        frame_codec=str(config.frame_codec),
        jpeg_quality=int(config.jpeg_quality),
        clips_per_shard=int(config.clips_per_shard),
        files_per_unit=int(config.files_per_unit),
        eval_fraction=float(config.eval_fraction))
    if s.frame_codec not in sources.FRAME_CODECS:
      raise ValueError(f"frame_codec must be one of {sources.FRAME_CODECS}, "
                       f"got {s.frame_codec!r}")
    for name in ("resolution", "num_frames", "clip_stride_frames",
                 "image_num_frames", "clips_per_shard", "files_per_unit"):
      if getattr(s, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(s, name)}")
    if s.fps <= 0:
      raise ValueError(f"fps must be > 0, got {s.fps}")
    if not 0.0 <= s.eval_fraction < 1.0:
      raise ValueError(f"eval_fraction must be in [0, 1), got {s.eval_fraction}")
    return s


# ----------------------------------------------------------------------------
# The evaluation split.

EVAL_SPLIT = "eval"
SPLITS = ("train", EVAL_SPLIT)


def eval_key(name: str) -> float:
  """A file's place in [0, 1) for the split: the first 64 bits of sha256(name).

  A fixed function of the name (not Python's salted hash()), so every
  process, machine and rerun agrees.
  """
  return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big") / 2.0**64


def split_of(name: str, fraction: float) -> str:
  """'eval' for a file held out for evaluation, else 'train'."""
  return EVAL_SPLIT if fraction > 0 and eval_key(name) < fraction else "train"


def shard_folder(split: str, kind: str) -> str:
  """Where a split's shards of a kind live in the output folder: 'video', 'eval/video'."""
  return kind if split == "train" else f"{EVAL_SPLIT}/{kind}"


# ----------------------------------------------------------------------------
# Manifests.


@dataclasses.dataclass(frozen=True)
class ManifestEntry:
  index: int  # 0-based position among the manifest's entries
  line: int  # 1-based line in the manifest file, for messages
  path: str  # resolved path ("" when the entry is unusable)
  caption: str
  problem: str = ""  # why the entry itself is unusable
  # The path relative to media_root (or the resolved path outside it): what
  # decides the file's split, so moving the media (to a bucket, say) keeps it.
  name: str = ""


def manifest_format(path: str, fmt: str = "auto") -> str:
  """"jsonl" or "csv" for a manifest file."""
  if fmt in ("jsonl", "csv"):
    return fmt
  if fmt != "auto":
    raise ValueError(f"manifest_format must be auto, jsonl or csv: {fmt!r}")
  ext = storage.splitext(path)[1].lower()
  if ext in _JSONL_EXTENSIONS:
    return "jsonl"
  if ext in _CSV_EXTENSIONS:
    return "csv"
  raise ValueError(f"{path}: cannot tell the manifest format from its "
                   f"extension; set manifest_format to jsonl or csv")


def iter_manifest(path: str, *, fmt: str = "auto", path_column: str = "path",
                  caption_column: str = "caption", path_format: str = "",
                  media_root: str = "", read_from: str = "") -> Iterator[ManifestEntry]:
  """Streams a manifest's entries, resolving paths; never skips silently.

  Rows that cannot be used (bad JSON, missing field, URL) come out with
  `problem` set, so they are reported like bad files. A CSV missing a
  configured column raises ValueError: that is a config error.

  Args:
    path: the manifest (local or gs://): paths resolve against its folder
      unless `media_root` is set, and messages name it.
    read_from: a local copy of it to read instead (`run` downloads a remote
      manifest once and reads it several times).
  """
  path = os.fspath(path)
  root = media_root or storage.dirname(storage.absolute(path))
  fmt = manifest_format(path, fmt)

  def entry(index, line, row):
    try:
      if path_format:
        rel = path_format.format(**row)
      elif path_column in row and row[path_column] not in (None, ""):
        rel = str(row[path_column])
      else:
        return ManifestEntry(index, line, "", "",
                             f"no '{path_column}' field")
    except (KeyError, IndexError, ValueError) as e:
      return ManifestEntry(index, line, "", "",
                           f"path_format {path_format!r} failed: {e!r}")
    if caption_column not in row or row[caption_column] is None:
      return ManifestEntry(index, line, rel, "", f"no '{caption_column}' field")
    if "://" in rel and not storage.is_remote(rel):
      return ManifestEntry(index, line, rel, "", "remote URLs other than gs:// are "
                           "not supported: download the file and list its path")
    try:
      resolved = storage.resolve(root, rel)
    except ValueError as e:
      return ManifestEntry(index, line, rel, "", str(e))
    inside = root.rstrip("/") + "/"
    name = resolved[len(inside):] if resolved.startswith(inside) else resolved
    return ManifestEntry(index, line, resolved, str(row[caption_column]), name=name)

  raw = storage.open_file(read_from or path, "rb")
  with io.TextIOWrapper(raw, encoding="utf-8",
                        newline="" if fmt == "csv" else None) as f:
    if fmt == "jsonl":
      index = 0
      for line_no, text in enumerate(f, start=1):
        if not text.strip():
          continue
        try:
          row = json.loads(text)
          if not isinstance(row, dict):
            raise ValueError("not a JSON object")
        except ValueError as e:
          yield ManifestEntry(index, line_no, "", "", f"bad JSON: {e}")
        else:
          yield entry(index, line_no, row)
        index += 1
    else:
      delimiter = "\t" if path.lower().endswith(".tsv") else ","
      reader = csv.DictReader(f, delimiter=delimiter)
      columns = reader.fieldnames or []
      needed = [caption_column] + ([] if path_format else [path_column])
      absent = [c for c in needed if c not in columns]
      if absent:
        raise ValueError(f"{path}: no column(s) {absent}; columns are "
                         f"{columns}. Set path_column / caption_column.")
      for index, row in enumerate(reader):
        yield entry(index, reader.line_num, row)


def _file_sha256(path: str) -> str:
  digest = hashlib.sha256()
  with storage.open_file(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def _count_lines(path: str) -> int:
  with storage.open_file(path, "rb") as f:
    return sum(1 for line in f if line.strip())


def _writer_options(codec: str) -> str:
  # group_size:1 keeps reads random-access; png/jpeg bytes gain nothing from
  # a second compressor, raw pixels lose 23-31% to zstd (see docstring).
  return "group_size:1," + ("zstd:3" if codec == "raw" else "uncompressed")


# ----------------------------------------------------------------------------
# Names in the output folder.


def _unit_report_path(out_dir: str, unit: int) -> str:
  return storage.join(out_dir, "units", f"unit-{unit:05d}.json")


def _worker_report_name(index: int, count: int) -> str:
  return f"worker-{index:05d}-of-{count:05d}.json"


_UNIT_REPORT = re.compile(r"^unit-(\d+)\.json$")
# A unit's shards and their temporary files (shard_writer): `video-00012-003...`.
_SHARD_UNIT = re.compile(r"^\.?(?:%s)-(\d+)-" % "|".join(sources.KINDS))


def _listing(folder: str) -> list[str]:
  return storage.listdir(folder) if storage.isdir(folder) else []


def _read_json_many(paths: list[str]) -> list[Any]:
  if not paths or not storage.is_remote(paths[0]):
    return [storage.read_json(p) for p in paths]
  with concurrent.futures.ThreadPoolExecutor(_REMOTE_READ_THREADS) as pool:
    return list(pool.map(storage.read_json, paths))


# ----------------------------------------------------------------------------
# One work unit (runs in a worker process).


def process_unit(out_dir: str, unit: int, entries: list[ManifestEntry],
                 settings: Settings, worker: int = 0) -> dict[str, Any]:
  """Decodes a unit's files, writes its shards, then its report (units/unit-UUUUU.json).

  A pure function of its arguments, so any engine may run it (docs/data.md):
  the leftovers of an earlier attempt at the unit must be gone first (`run`
  removes them, `_own_reports`).
  """
  start = time.time()
  options = _writer_options(settings.frame_codec)
  writers = {(split, kind): shard_writer.ShardWriter(
      storage.join(out_dir, shard_folder(split, kind)), f"{kind}-{unit:05d}",
      settings.clips_per_shard, options) for split in SPLITS for kind in sources.KINDS}
  report = {"unit": unit, "worker": worker, "first_entry": entries[0].index,
            "num_entries": len(entries), "video_files": 0, "image_files": 0,
            "video_clips": 0, "image_clips": 0, "skipped": [],
            "eval_video_files": 0, "eval_image_files": 0, "eval_video_clips": 0,
            "eval_image_clips": 0, "eval_sources": []}
  for e in entries:
    kind = "image" if video_io.is_image_path(e.path) else "video"
    split = split_of(e.name or e.path, settings.eval_fraction)
    try:
      if e.problem:
        raise video_io.VideoDecodeError(
            e.path or "<no path>", BAD_MANIFEST_ENTRY,
            f"manifest line {e.line}: {e.problem}")
      if kind == "image":
        clips = [video_io.Clip(video_io.read_image(
            e.path, resolution=settings.resolution,
            num_frames=settings.image_num_frames), 0.0)]
      else:
        clips = list(video_io.iter_clips(
            e.path, num_frames=settings.num_frames,
            stride=settings.clip_stride_frames, fps=settings.fps,
            resolution=settings.resolution,
            max_clips=settings.max_clips_per_video))
    except video_io.VideoDecodeError as err:
      report["skipped"].append({"path": e.path, "line": e.line,
                                "reason": err.kind, "message": str(err)})
      continue
    except Exception as err:  # pylint: disable=broad-except
      # One odd file must not stop a long job; the summary names it.
      report["skipped"].append({
          "path": e.path, "line": e.line, "reason": UNEXPECTED_ERROR,
          "message": f"{e.path}: unexpected {type(err).__name__}: {err}"})
      continue
    # Writing happens outside the try: an I/O failure must stop the unit.
    for clip in clips:
      writers[split, kind].write(sources.encode_clip_record(
          clip.frames, kind=kind, caption=e.caption, source=e.path,
          line=e.line, start_time=clip.start_time,
          fps=settings.fps if kind == "video" else 0.0,
          codec=settings.frame_codec, jpeg_quality=settings.jpeg_quality))
    # The top-level counts cover both splits; eval_* the held-out part.
    report[f"{kind}_files"] += 1
    report[f"{kind}_clips"] += len(clips)
    if split == EVAL_SPLIT:
      report[f"eval_{kind}_files"] += 1
      report[f"eval_{kind}_clips"] += len(clips)
      report["eval_sources"].append(e.path)
  for w in writers.values():
    w.close()
  report["shards"] = {kind: writers["train", kind].shards for kind in sources.KINDS}
  report["eval_shards"] = {kind: writers[EVAL_SPLIT, kind].shards for kind in sources.KINDS}
  report["seconds"] = round(time.time() - start, 3)
  storage.write_json(_unit_report_path(out_dir, unit), report)
  return report


# ----------------------------------------------------------------------------
# Driver.


@dataclasses.dataclass(frozen=True)
class Worker:
  index: int
  count: int

  def owns(self, unit: int) -> bool:
    return unit % self.count == self.index


def work_units(config: ml_collections.ConfigDict
               ) -> Iterator[tuple[int, list[ManifestEntry]]]:
  """(unit, its manifest entries) for every unit of `config.manifest`, as every worker
  cuts them: to run `process_unit` on another engine (docs/data.md)."""
  manifest = storage.absolute(os.fspath(config.manifest))
  yield from _units(iter_manifest(
      manifest, fmt=manifest_format(manifest, config.manifest_format),
      path_column=config.path_column, caption_column=config.caption_column,
      path_format=config.path_format, media_root=config.media_root),
      int(config.files_per_unit))


def _units(entries: Iterator[ManifestEntry], size: int
           ) -> Iterator[tuple[int, list[ManifestEntry]]]:
  chunk: list[ManifestEntry] = []
  for e in entries:
    chunk.append(e)
    if len(chunk) == size:
      yield e.index // size, chunk
      chunk = []
  if chunk:
    yield chunk[0].index // size, chunk


_CHECKED_METADATA = ("format", "record_version", "settings", "manifest_sha256")


def _check_metadata(out_dir: str, metadata: dict[str, Any]) -> None:
  """Writes metadata.json, or checks a resumed run (another worker) matches it.

  Read back after writing: of two workers that start together with other
  settings, one is refused.
  """
  path = storage.join(out_dir, "metadata.json")
  if not storage.exists(path):
    storage.write_json(path, metadata)
  old = storage.read_json(path)
  if isinstance(old.get("settings"), dict):
    # Folders prepared before the evaluation split had none: eval_fraction=0 resumes them.
    old["settings"] = {"eval_fraction": 0.0, **old["settings"]}
  diff = {k: (old.get(k), metadata[k]) for k in _CHECKED_METADATA
          if old.get(k) != metadata[k]}
  if diff:
    raise ValueError(
        f"{out_dir} holds data prepared with other settings or another "
        f"manifest ({sorted(diff)} differ: was/now {diff}); use a new output "
        "directory or delete this one")


def _own_reports(out_dir: str, worker: Worker) -> dict[int, dict[str, Any]]:
  """Reports of this worker's finished units whose shards are all still there.

  Also removes what this worker's unfinished units left behind (shards
  published before a kill stopped the unit's report, temporary files), so
  each is redone from scratch. One listing per folder, not one per unit.
  """
  folders = [shard_folder(split, kind) for split in SPLITS for kind in sources.KINDS]
  present = {f: set(_listing(storage.join(out_dir, f))) for f in folders}
  units_dir = storage.join(out_dir, "units")
  mine = sorted(int(m.group(1)) for m in map(_UNIT_REPORT.match, _listing(units_dir))
                if m and worker.owns(int(m.group(1))))
  reports = {}
  for unit, report in zip(mine, _read_json_many([_unit_report_path(out_dir, u)
                                                 for u in mine])):
    lost = [s["file"] for split, key in (("train", "shards"), (EVAL_SPLIT, "eval_shards"))
            for kind in sources.KINDS for s in report.get(key, {}).get(kind, [])
            if s["file"] not in present[shard_folder(split, kind)]]
    if lost:
      # Redo rather than silently serve a hole in the data.
      logging.warning("unit %d: shard(s) %s missing; redoing the unit", unit, lost)
      storage.remove(_unit_report_path(out_dir, unit))
      continue
    reports[unit] = report
  for folder in folders:
    for name in sorted(present[folder]):
      m = _SHARD_UNIT.match(name)
      if m and worker.owns(int(m.group(1))) and int(m.group(1)) not in reports:
        storage.remove(storage.join(out_dir, folder, name))
  return reports


EVAL_RULE = ("sha256 of the manifest path relative to media_root, first 64 bits / 2**64 "
             "< fraction (phenaki_jax/data/prepare.py eval_key)")


def _summarize(reports: dict[int, dict[str, Any]], *, units_total: int | None,
               workers: list[dict[str, Any]], complete: bool,
               elapsed: float, fraction: float) -> dict[str, Any]:
  summary: dict[str, Any] = {
      "complete": complete, "units_done": len(reports), "units_total": units_total,
      "files_read": 0, "files_ok": 0, "video_files": 0, "image_files": 0,
      "clips_written": 0, "video_clips": 0, "image_clips": 0, "files_skipped": 0,
      "skipped_by_reason": {}, "skipped_files": [],
      "shards": {k: [] for k in sources.KINDS},
      "eval_split": {"fraction": fraction, "rule": EVAL_RULE, "video_files": 0,
                     "image_files": 0, "video_clips": 0, "image_clips": 0, "files": []},
      "eval_shards": {k: [] for k in sources.KINDS},
      "workers": workers, "elapsed_s": round(elapsed, 3)}
  held_out = summary["eval_split"]
  for unit in sorted(reports):
    r = reports[unit]
    summary["files_read"] += r["num_entries"]
    for key in ("video_files", "image_files", "video_clips", "image_clips"):
      summary[key] += r[key]
    for skip in r["skipped"]:
      by_reason = summary["skipped_by_reason"]
      by_reason[skip["reason"]] = by_reason.get(skip["reason"], 0) + 1
      summary["skipped_files"].append(skip)
    for kind in sources.KINDS:
      summary["shards"][kind] += [
          {"file": f"{kind}/{s['file']}", "records": s["records"]}
          for s in r["shards"][kind]]
      # Units written before the split existed have no eval_* fields.
      summary["eval_shards"][kind] += [
          {"file": f"{shard_folder(EVAL_SPLIT, kind)}/{s['file']}", "records": s["records"]}
          for s in r.get("eval_shards", {}).get(kind, [])]
      for what in ("files", "clips"):
        held_out[f"{kind}_{what}"] += r.get(f"eval_{kind}_{what}", 0)
    held_out["files"] += r.get("eval_sources", [])
  summary["files_ok"] = summary["video_files"] + summary["image_files"]
  summary["files_skipped"] = len(summary["skipped_files"])
  summary["clips_written"] = summary["video_clips"] + summary["image_clips"]
  return summary


def _worker_entry(report: dict[str, Any]) -> dict[str, Any]:
  """A worker's line in the summary (no timings: a rerun changes nothing)."""
  units = report["unit_reports"]
  return {"worker_index": report["worker_index"], "units_owned": report["units_owned"],
          "units_done": len(units), "complete": report["complete"],
          "clips_written": sum(u["video_clips"] + u["image_clips"] for u in units),
          "files_skipped": sum(len(u["skipped"]) for u in units)}


def merge(out_dir: str, worker_count: int, *, write_partial: bool = True,
          elapsed: float = 0.0) -> dict[str, Any]:
  """The summary merged from the reports of workers 0..worker_count-1.

  Complete when every worker's report is there and says complete. It is
  written to summary.json when complete, or with `write_partial`.
  """
  out_dir = os.fspath(out_dir)
  folder = storage.join(out_dir, "workers")
  names = set(_listing(folder))
  wanted = [_worker_report_name(i, worker_count) for i in range(worker_count)]
  found = [n for n in wanted if n in names]
  worker_reports = _read_json_many([storage.join(folder, n) for n in found])
  reports = {u["unit"]: u for w in worker_reports for u in w["unit_reports"]}
  totals = {w["units_total"] for w in worker_reports}
  complete = (len(found) == worker_count and all(w["complete"] for w in worker_reports)
              and len(totals) == 1 and len(reports) == totals.pop())
  units_total = worker_reports[0]["units_total"] if worker_reports else None
  metadata_path = storage.join(out_dir, "metadata.json")
  settings = (storage.read_json(metadata_path).get("settings", {})
              if storage.exists(metadata_path) else {})
  summary = _summarize(reports, units_total=units_total,
                       workers=[_worker_entry(w) for w in worker_reports],
                       complete=complete, elapsed=elapsed,
                       fraction=float(settings.get("eval_fraction", 0.0)))
  missing = sorted(set(range(worker_count)) - {w["worker_index"] for w in worker_reports})
  unfinished = [w["worker_index"] for w in worker_reports if not w["complete"]]
  if complete or write_partial:
    storage.write_json(storage.join(out_dir, "summary.json"), summary)
  if not complete:
    logging.info("prepare %s: waiting on workers %s (no report) and %s (unfinished) of %d; "
                 "the last to finish writes summary.json", out_dir, missing, unfinished,
                 worker_count)
  return summary


def _log_report(report: dict[str, Any]) -> None:
  for skip in report["skipped"]:
    logging.warning("skipped (%s): %s", skip["reason"], skip["message"])
  logging.info("unit %d: %d files, %d video clips, %d images, %d skipped; held out for "
               "evaluation: %d video clips, %d images", report["unit"], report["num_entries"],
               report["video_clips"], report["image_clips"], len(report["skipped"]),
               report["eval_video_clips"], report["eval_image_clips"])


def _this_worker(config: ml_collections.ConfigDict) -> Worker:
  if config.worker_count == 0:
    # jax only here: the decoding processes import this module too.
    import jax  # pylint: disable=g-import-not-at-top
    return Worker(jax.process_index(), jax.process_count())
  return Worker(int(config.worker_index), int(config.worker_count))


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Prepares (or resumes preparing) this worker's units of `config.manifest` into `workdir`.

  Returns:
    The summary merged from every worker's report, also written to
    `workdir/summary.json` when every worker has finished (or always with
    worker_count=1, or with merge_only).
  """
  start = time.time()
  unknown = sorted(set(config.keys()) - set(default_config().keys())
                   - {"job"})
  if unknown:
    raise ValueError(f"unknown prepare config key(s) {unknown}; see "
                     "phenaki_jax.data.prepare.default_config")
  prepare_config.check(config)
  settings = Settings.from_config(config)
  worker = _this_worker(config)
  out_dir = storage.absolute(os.fspath(workdir))
  if config.merge_only:
    if not storage.exists(storage.join(out_dir, "metadata.json")):
      raise FileNotFoundError(f"--workdir={out_dir}: nothing prepared there to merge")
    return merge(out_dir, worker.count, elapsed=time.time() - start)
  manifest = storage.absolute(os.fspath(config.manifest)) if config.manifest else ""
  if not manifest or not storage.isfile(manifest):
    raise FileNotFoundError(f"manifest not found: {config.manifest!r}")
  storage.check_writable_root(out_dir, "--workdir")
  with _worker_lock(out_dir, worker), storage.local_copy(manifest) as local_manifest:
    return _run_locked(config, manifest, local_manifest, out_dir, settings, worker, start)


class _worker_lock:  # pylint: disable=invalid-name
  """Refuses a second run of the same worker on a local output folder.

  Released by the OS even on SIGKILL, so a dead run never blocks. Object
  storage has no locks: there, run each worker index once at a time.
  """

  def __init__(self, out_dir: str, worker: Worker):
    self._path = (None if storage.is_remote(out_dir) else
                  storage.join(out_dir, f".lock-worker-{worker.index:05d}"))
    self._out_dir, self._file = out_dir, None

  def __enter__(self):
    if self._path is None:
      return self
    self._file = open(self._path, "w")  # always local (see __init__)
    try:
      fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as e:
      self._file.close()
      raise RuntimeError(f"another prepare is writing to {self._out_dir} as this "
                         f"worker ({self._path})") from e
    return self

  def __exit__(self, *exc):
    if self._file is not None:
      self._file.close()


def _run_locked(config: ml_collections.ConfigDict, manifest: str, local_manifest: str,
                out_dir: str, settings: Settings, worker: Worker, start: float
                ) -> dict[str, Any]:
  """`run` once it holds this worker's lock (local outputs) and a local manifest copy."""
  fmt = manifest_format(manifest, config.manifest_format)
  _check_metadata(out_dir, {
      "format": METADATA_FORMAT, "record_version": sources.RECORD_VERSION,
      "settings": dataclasses.asdict(settings),
      "manifest_sha256": _file_sha256(local_manifest), "manifest": manifest,
      "manifest_format": fmt,
      # Handy copies for readers; `settings` is what a rerun checks.
      "resolution": settings.resolution, "num_frames": settings.num_frames,
      "image_num_frames": settings.image_num_frames, "fps": settings.fps,
      "frame_codec": settings.frame_codec})

  reports = _own_reports(out_dir, worker)
  entries = iter_manifest(
      manifest, fmt=fmt, path_column=config.path_column,
      caption_column=config.caption_column, path_format=config.path_format,
      media_root=config.media_root, read_from=local_manifest)
  approx_total = max(0, _count_lines(local_manifest) - (fmt == "csv")) // worker.count
  progress = tqdm.tqdm(total=approx_total, unit="file",
                       desc="prepare" if worker.count == 1 else
                       f"prepare {worker.index}/{worker.count}",
                       disable=not config.progress, file=sys.stderr)
  max_units = int(config.max_units)

  stopped_early = []
  owned = []
  seen = [0]  # units in the manifest
  done_before = set(reports)

  def pending() -> Iterator[tuple[int, list[ManifestEntry]]]:
    started = 0
    for unit, chunk in _units(entries, settings.files_per_unit):
      seen[0] = unit + 1
      if not worker.owns(unit):
        continue
      owned.append(unit)
      if unit in reports:
        progress.update(len(chunk))
        continue
      if max_units and started >= max_units:
        stopped_early.append(unit)
        continue  # keep counting the units this worker owns
      started += 1
      yield unit, chunk

  def finished(report: dict[str, Any]) -> None:
    reports[report["unit"]] = report
    progress.update(report["num_entries"])
    _log_report(report)

  num_workers = int(config.num_workers) or os.cpu_count() or 1
  todo = pending()
  try:
    if num_workers == 1:
      for unit, chunk in todo:
        finished(process_unit(out_dir, unit, chunk, settings, worker.index))
    else:
      _run_pool(out_dir, todo, settings, num_workers, finished, worker.index)
  finally:
    progress.close()
  complete = not stopped_early and all(u in reports for u in owned)
  elapsed = time.time() - start
  storage.write_json(storage.join(out_dir, "workers", _worker_report_name(worker.index,
                                                                          worker.count)), {
      "worker_index": worker.index, "worker_count": worker.count, "complete": complete,
      "units_total": seen[0], "units_owned": len(owned),
      "units_this_run": len(set(reports) - done_before), "elapsed_s": round(elapsed, 3),
      "unit_reports": [reports[u] for u in sorted(reports)]})
  summary = merge(out_dir, worker.count, write_partial=worker.count == 1, elapsed=elapsed)
  logging.info("prepare %s%s: %d files read, %d clips written, %d skipped %s",
               "complete" if summary["complete"] else
               ("stopped early" if stopped_early else "this worker done"),
               "" if worker.count == 1 else f" (worker {worker.index} of {worker.count})",
               summary["files_read"], summary["clips_written"],
               summary["files_skipped"], summary["skipped_by_reason"])
  held_out = summary["eval_split"]
  if summary["complete"] and settings.eval_fraction > 0:
    if held_out["video_clips"]:
      logging.info("evaluation split (eval_fraction=%g): %d video files (%d clips), %d images "
                   "held out in %s/eval", settings.eval_fraction, held_out["video_files"],
                   held_out["video_clips"], held_out["image_files"], out_dir)
    else:
      # Not an error: a small manifest may have no file below the fraction.
      logging.warning("evaluation split (eval_fraction=%g): no video of %d fell in it, so the "
                      "trainers will evaluate on training clips; raise config.eval_fraction "
                      "(e.g. 0.2 for a few dozen files) and prepare into a new folder",
                      settings.eval_fraction, summary["video_files"])
  return summary


def _run_pool(out_dir, todo, settings, num_workers, finished, worker_index) -> None:
  """Runs units on spawned processes, a few in flight per worker."""
  ctx = multiprocessing.get_context("spawn")
  with concurrent.futures.ProcessPoolExecutor(num_workers,
                                              mp_context=ctx) as pool:
    in_flight = set()
    try:
      for unit, chunk in todo:
        in_flight.add(pool.submit(process_unit, out_dir, unit, chunk,
                                  settings, worker_index))
        # Bounded submission: the manifest may be far larger than memory.
        while len(in_flight) >= 2 * num_workers:
          done, in_flight = concurrent.futures.wait(
              in_flight, return_when=concurrent.futures.FIRST_COMPLETED)
          for future in done:
            finished(future.result())
      for future in concurrent.futures.as_completed(in_flight):
        finished(future.result())
    except BaseException:
      for future in in_flight:
        future.cancel()
      raise


# ----------------------------------------------------------------------------
# Command line.


def main(argv: list[str]) -> None:
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = flags.FLAGS.config
  if flags.FLAGS.manifest:
    config.manifest = flags.FLAGS.manifest
  if not config.manifest:
    raise app.UsageError("--manifest is required")
  summary = run(config, flags.FLAGS.out)
  print(json.dumps({k: v for k, v in summary.items()
                    if k not in ("skipped_files", "shards")}, indent=1))


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  config_flags.DEFINE_config_dict("config", default_config(),
                                  "Prepare settings; override --config.X=Y.")
  flags.DEFINE_string("manifest", "", "Manifest (shorthand for "
                      "--config.manifest).")
  flags.DEFINE_string("out", None, "Output directory.", required=True)
  app.run(main)
