"""The input section (`config.input.*`): which clips and images, how many, how they are read.

One pipeline (phenaki_jax/data/pipeline.py) serves the tokenizer trainer, the
generator trainer and pre-tokenising, so they share these keys; the generator
adds its own (`generator_defaults`).
"""
from __future__ import annotations

import ml_collections

from phenaki_jax import storage
from phenaki_jax.config import errors
from phenaki_jax.config import sizes

KINDS = ("shapes", "shards", "tfds")
# The per-step sizes; a trainer checks them with its other positive keys first.
POSITIVE_KEYS = ("input.batch_size", "input.num_frames", "input.resolution")


def defaults() -> ml_collections.ConfigDict:
  """The `input` keys of the tokenizer trainer (and of pre-tokenising)."""
  c = ml_collections.ConfigDict()
  # 'shapes' (built in), 'shards' (ArrayRecord from configs/prepare.py) or
  # 'tfds' (a TFDS dataset prepared in ArrayRecord format).
  c.data = "shapes"
  c.video_shards = ""  # a prepare output dir, a shard dir, a glob, or a comma list
  c.image_shards = ""
  # The held-out clips evaluation reads (data='shards'): '' takes the eval
  # split configs/prepare.py wrote beside video_shards (its eval/ folder, when
  # video_shards is a prepare output folder that has one); else a prepare
  # output folder (its eval split), a shard dir, a glob or a comma list. With
  # none, evaluation reads training clips, and logs and reports say so
  # (phenaki_jax/data/pipeline.py eval_source).
  c.eval_shards = ""
  c.tfds_video = ""  # TFDS name ('name/config:version') or prepared folder
  c.tfds_image = ""
  c.tfds_split = "train"
  c.tfds_eval_split = ""  # the held-out split evaluation reads; '' : tfds_split (training clips)
  c.tfds_data_dir = ""
  c.tfds_frames_key = "video"  # for image datasets e.g. 'image'
  c.tfds_caption_key = "caption"
  # Augmentation, the same for every frame of a clip. Off for the built-in
  # shapes, whose captions name directions (a flip would contradict them).
  c.random_crop_min_scale = 1.0  # crop side ~ U(min, 1)·side, resized back; 1 = off
  c.horizontal_flip = False
  c.batch_size = 8  # global, per step
  c.num_frames, c.resolution = sizes.CLIPS["default"]
  c.video_ratio = 0.8  # fraction of steps (= of examples) that are video clips
  c.num_workers = 0  # grain worker processes; 0 reads in the trainer process
  c.prefetch = 2
  return c


def generator_defaults() -> ml_collections.ConfigDict:
  """The generator trainer's `input` keys: the same as the tokenizer's, plus tokens and stories.

  Clips are encoded on the fly by the frozen tokenizer inside the train step;
  or input.data='tokens': codes (and cached text embeddings) written by
  configs/pretokenize.py into input.token_shards, for large runs.
  """
  c = defaults()
  c.token_shards = ""
  # The story task on the built-in data: this share of the video batches are
  # two-segment story clips (phenaki_jax/data/synthetic.py ShapesStorySource)
  # whose first K frames, K from story_context_frames, are the given context.
  # Other data has no stories to render: there only prefix.* applies.
  c.story_ratio = 0.25
  c.story_context_frames = (1, 3, 5, 7, 9)
  return c


def eval_defaults() -> ml_collections.ConfigDict:
  """The held-out clips of the tokenizer evaluation.

  Each key left at its sentinel ('' or -1) takes the tokenizer's own training
  value (its saved config), so by default the clips look like those it trained
  on. For real data, point input.video_shards at shards prepared from videos
  it did not train on.
  """
  c = ml_collections.ConfigDict()
  c.data = ""  # 'shapes', 'shards' or 'tfds'
  c.video_shards = ""
  c.tfds_video = ""
  c.tfds_split = ""
  c.tfds_data_dir = ""
  c.tfds_frames_key = ""
  c.num_frames = -1  # 1 + k·temporal_patch_size of the tokenizer
  c.resolution = -1  # must equal the tokenizer's
  return c


def check_eval(config: ml_collections.ConfigDict) -> None:
  """`input` as eval_defaults has it."""
  i = config.input
  errors.require(i.data in ("",) + KINDS, "input.data", i.data,
                 "must be 'shapes', 'shards' or 'tfds' ('' takes the tokenizer's)")
  for key in ("num_frames", "resolution"):
    errors.require(isinstance(i[key], int) and (i[key] == -1 or i[key] > 0), f"input.{key}",
                   i[key], "must be positive, or -1 for the tokenizer's")


def check(config: ml_collections.ConfigDict) -> None:
  """The input keys that do not depend on a model."""
  i = config.input
  errors.require(0.0 <= i.video_ratio <= 1.0, "input.video_ratio", i.video_ratio,
                 "must be in [0, 1]")
  if i.get("story_ratio", 0.0) > 0:
    errors.require(i.story_ratio <= 1.0, "input.story_ratio", i.story_ratio, "must be in [0, 1]")
    errors.require(len(i.story_context_frames) > 0 and all(
        1 <= k < i.num_frames for k in i.story_context_frames), "input.story_context_frames",
                   i.story_context_frames, f"must be frame counts in [1, {i.num_frames})")
  kinds = KINDS + (("tokens",) if "token_shards" in i else ())
  errors.require(i.data in kinds, "input.data", i.data, f"must be one of {kinds}")
  if i.data == "tokens":
    errors.require(bool(i.token_shards), "input.token_shards", i.token_shards,
                   "is required when input.data='tokens' (a configs/pretokenize.py output "
                   "folder)")
    errors.require(i.random_crop_min_scale == 1.0 and not i.horizontal_flip, "input.data", i.data,
                   "pre-tokenised clips cannot be augmented: set input.random_crop_min_scale=1 "
                   "and input.horizontal_flip=False (or augment when pretokenizing)")
  errors.require(0.0 < i.random_crop_min_scale <= 1.0, "input.random_crop_min_scale",
                 i.random_crop_min_scale, "must be in (0, 1]")
  needs = {"shards": ("video_shards", "image_shards"), "tfds": ("tfds_video", "tfds_image")}
  if i.data in needs:
    video_key, image_key = needs[i.data]
    if i.video_ratio > 0:
      errors.require(bool(i[video_key]), f"input.{video_key}", i[video_key],
                     f"is required when input.data={i.data!r} and input.video_ratio > 0")
    if i.video_ratio < 1:
      errors.require(bool(i[image_key]), f"input.{image_key}", i[image_key],
                     f"is required when input.data={i.data!r} and input.video_ratio < 1")
  errors.require(i.num_workers >= 0, "input.num_workers", i.num_workers, "must be >= 0")
  check_eval_shards(config)


def check_eval_shards(config: ml_collections.ConfigDict) -> None:
  """input.eval_shards names held-out shards that exist, for shard data only."""
  i = config.input
  if not i.get("eval_shards"):
    return
  errors.require(i.data == "shards", "input.eval_shards", i.eval_shards,
                 f"is for input.data='shards' (this run reads input.data={i.data!r}); "
                 "leave it ''")
  for path in [p for p in i.eval_shards.split(",") if p]:
    if not any(c in path for c in "*?["):  # a glob is checked when it is expanded
      errors.require(storage.exists(path), "input.eval_shards", i.eval_shards,
                     f"{path} does not exist (a prepare output folder, a shard folder, a "
                     "glob or a comma list of shard files)")
