"""The prepare job's settings: a captioned manifest into ArrayRecord clip shards.

phenaki_jax/data/prepare.py `run` reads these keys (and checks their values:
`Settings.from_config`); configs/prepare.py starts from them.
"""
from __future__ import annotations

import ml_collections

from phenaki_jax.config import sizes


def defaults() -> ml_collections.ConfigDict:
  """The settings of data/prepare.py `run` (no `job` key: schema.prepare_defaults adds it)."""
  c = ml_collections.ConfigDict()
  c.manifest = ""  # JSONL or CSV/TSV file.
  c.manifest_format = "auto"  # "auto" (by extension), "jsonl" or "csv".
  c.path_column = "path"
  c.caption_column = "caption"
  # If set, str.format template over a row's fields giving the path, e.g.
  # WebVid "{page_dir}/{videoid}.mp4"; path_column is then unused.
  c.path_format = ""
  c.media_root = ""  # Base of relative paths; "" = the manifest's folder.
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
  c.files_per_unit = 64  # Manifest entries per resumable work unit.
  c.num_workers = 0  # Processes; 0 = one per CPU, 1 = in this process.
  c.max_units = 0  # Stop after this many new units (0 = all); for tests.
  c.progress = True  # tqdm progress bar on stderr.
  return c
