"""Prepare a captioned video/image manifest into ArrayRecord clip shards.

  python -m phenaki_jax.main --config=configs/prepare.py --workdir=DIR \
      --config.manifest=videos/captions.jsonl
  # Machine I of N, one shared output folder (DIR and the manifest may be gs://):
  python -m phenaki_jax.main --config=configs/prepare.py --workdir=gs://B/prepared \
      --config.manifest=gs://B/videos/captions.jsonl \
      --config.worker_index=I --config.worker_count=N

An evaluation split is written beside the training shards (DIR/eval/):
about `eval_fraction` (default 1%) of the manifest's files, chosen by a hash of
each file's path, so no video has clips on both sides; the trainers evaluate
on it (docs/data.md#the-evaluation-split).

Variants (`configs/prepare.py:VARIANT`):
  webvid  WebVid CSV (videoid, name, page_dir, ...) with the videos
          downloaded to `{page_dir}/{videoid}.mp4` next to the CSV.
  tiny    the small test media in tests/data/media, 32x32, in-process; runs
          in seconds from the repository root; one of its 3 videos (and
          one image) is held out.

Field meanings: `phenaki_jax/config/prepare.py`; several machines, buckets
and Apache Beam: docs/data.md.
"""

import ml_collections

from phenaki_jax.config import args
from phenaki_jax.config import schema


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the prepare config, optionally a named variant."""
  arg = args.parse_arg(arg, "configs/prepare.py", variant=args.OneOf("default", "webvid", "tiny"))
  config = schema.prepare_defaults()
  if arg.variant == "webvid":
    config.manifest_format = "csv"
    config.caption_column = "name"
    config.path_format = "{page_dir}/{videoid}.mp4"
  elif arg.variant == "tiny":
    config.manifest = "tests/data/media/manifest.jsonl"
    config.resolution = 32
    config.files_per_unit = 4
    config.num_workers = 1
    # 1% of 6 files expects none: 0.2 holds out arm_wrestling_2s.mp4 and rocket.jpg.
    config.eval_fraction = 0.2
  return config
