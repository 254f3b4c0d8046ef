"""The prepare job's settings: a captioned manifest into ArrayRecord clip shards.

phenaki_jax/data/prepare.py `run` reads these keys (and checks their values:
`check` here, before any work, then `Settings.from_config`); configs/prepare.py
starts from them.
"""
from __future__ import annotations

import ml_collections

from phenaki_jax.config import sizes


def defaults() -> ml_collections.ConfigDict:
  """The settings of data/prepare.py `run` (no `job` key: schema.prepare_defaults adds it)."""
  c = ml_collections.ConfigDict()
  c.manifest = ""  # JSONL or CSV/TSV file (local or gs://).
  c.manifest_format = "auto"  # "auto" (by extension), "jsonl" or "csv".
  c.path_column = "path"
  c.caption_column = "caption"
  # If set, str.format template over a row's fields giving the path, e.g.
  # WebVid "{page_dir}/{videoid}.mp4"; path_column is then unused.
  c.path_format = ""
  c.media_root = ""  # Base of relative paths (local or gs://); "" = the manifest's folder.
  # Square side (resize on the short side, centre crop) and frames per video
  # clip: the default tokenizer's clips, 1 + 5 * temporal patch 2 frames.
  c.num_frames, c.resolution = sizes.CLIPS["default"]
  c.fps = 8.0  # Clips are resampled to this rate (Phenaki: 8 fps).
  c.clip_stride_frames = 0  # Frames between clip starts; 0 = num_frames.
  c.max_clips_per_video = 0  # 0 = every clip of every video.
  c.image_num_frames = 1  # >1 repeats an image into a still clip.
  c.frame_codec = "raw"  # "raw" (zstd'd shards), "png" or "jpeg".
  c.jpeg_quality = 95
  c.clips_per_shard = 1024  # Upper bound on records per shard file.
  # The evaluation split, written beside the training shards (eval/video,
  # eval/image): a manifest entry goes there when a hash of its path (relative
  # to media_root) falls below this fraction, so every clip of a file is on the
  # same side, whatever the worker count or order, and adding files to a
  # manifest never moves one that was there. No minimum: a manifest of 50 files
  # expects 0.5 of them in the split (set e.g. 0.2 for a small one); the
  # summary says how many it got. 0: no split (the trainers then evaluate on
  # training clips, and say so).
  c.eval_fraction = 0.01
  c.files_per_unit = 64  # Manifest entries per resumable work unit.
  c.num_workers = 0  # Decoding processes on this machine; 0 = one per CPU, 1 = in this process.
  # Several machines preparing one manifest into one output folder: this one's
  # index and how many there are. Unit U belongs to worker U % worker_count;
  # the last worker to finish writes the merged summary.json. worker_count=0:
  # one worker per JAX process, this one jax.process_index() (a pod started
  # with main.py --distributed=on, as launch/tpu_pod.sh run does).
  c.worker_index = 0
  c.worker_count = 1
  c.merge_only = False  # Only merge the workers' reports into summary.json (decodes nothing).
  c.max_units = 0  # Stop after this many new units (0 = all); for tests.
  c.progress = True  # tqdm progress bar on stderr.
  return c


def _require(ok: bool, key: str, value, why: str) -> None:
  # errors.require's message; a plain ValueError, as errors.py imports jax and
  # every spawned decoding process imports this module.
  if not ok:
    raise ValueError(f"config.{key}={value!r}: {why}")


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def check(config: ml_collections.ConfigDict) -> None:
  """The keys that say who does what, checked before any work; the error names the key."""
  count = config.worker_count
  _require(_is_int(count) and count >= 0, "worker_count", count,
           "must be a positive integer, or 0 for one worker per JAX process")
  index = config.worker_index
  if count == 0:
    _require(index == 0, "worker_index", index,
             "must be left at 0 with config.worker_count=0 (each JAX process is its own worker)")
  else:
    _require(_is_int(index) and 0 <= index < count, "worker_index", index,
             f"must be an integer in [0, config.worker_count={count})")
  _require(_is_int(config.num_workers) and config.num_workers >= 0, "num_workers",
           config.num_workers, "must be >= 0 (0 = one process per CPU)")
  _require(isinstance(config.merge_only, bool), "merge_only", config.merge_only,
           "must be True or False")
  fraction = config.eval_fraction
  _require(isinstance(fraction, (int, float)) and not isinstance(fraction, bool)
           and 0.0 <= fraction < 1.0, "eval_fraction", fraction,
           "must be in [0, 1): the share of manifest files held out for evaluation")
