"""grain input pipelines: sources -> per-process shard -> shuffle -> batch -> mix.

How images and videos share a step: every batch is *either* video clips
(B, T, H, W, 3) *or* images as 1-frame clips (B, 1, H, W, 3); grain mixes the
two batched streams at `video_ratio` as a deterministic interleave (for 0.8:
four video batches, one image batch, …). Batches of one kind have one static
shape, so the train step compiles twice (once per kind) and nothing is padded.
With equal batch sizes, the fraction of examples that are videos equals
`video_ratio` exactly. Every process builds the same interleave, so all
processes agree on the kind of every step.
"""
from __future__ import annotations

from typing import Any

import grain
import ml_collections
import numpy as np

from phenaki_jax.data import synthetic

# Eval clips come from a different seed of the same generator: same
# distribution, different examples.
EVAL_SEED_OFFSET = 1_000_003


def make_sources(input_cfg: ml_collections.ConfigDict, seed: int) -> tuple[Any, Any]:
  """(video source or None, image source or None), each a grain random-access source."""
  want_video = input_cfg.video_ratio > 0
  want_image = input_cfg.video_ratio < 1
  if input_cfg.data == "shapes":
    video = synthetic.ShapesVideoSource(num_frames=input_cfg.num_frames,
                                        resolution=input_cfg.resolution, seed=seed)
    image = synthetic.ShapesImageSource(resolution=input_cfg.resolution, seed=seed + 1)
  elif input_cfg.data == "shards":
    from phenaki_jax.data import sources  # pylint: disable=g-import-not-at-top
    video = sources.ClipShardSource(input_cfg.video_shards) if want_video else None
    image = sources.ClipShardSource(input_cfg.image_shards) if want_image else None
  else:
    raise ValueError(f"config.input.data={input_cfg.data!r}: must be 'shapes' or 'shards'")
  return (video if want_video else None), (image if want_image else None)


class SelectFrames(grain.transforms.Map):
  """Keeps the uint8 frames; captions are not needed by the tokenizer."""

  def map(self, element: dict) -> dict:
    return {"frames": np.asarray(element["frames"], np.uint8)}


def _batched_stream(source: Any, *, batch_size: int, seed: int, process_index: int,
                    process_count: int) -> grain.MapDataset:
  ds = grain.MapDataset.source(source)
  # Each process reads a disjoint slice, so N processes see each example once per epoch.
  ds = ds[process_index::process_count]
  ds = ds.shuffle(seed=seed).repeat()
  ds = ds.map(SelectFrames())
  return ds.batch(batch_size, drop_remainder=True)


def make_train_dataset(input_cfg: ml_collections.ConfigDict, *, seed: int, process_index: int = 0,
                       process_count: int = 1) -> grain.IterDataset:
  """The infinite, checkpointable stream of this process's local batches."""
  if input_cfg.batch_size % process_count:
    raise ValueError(f"config.input.batch_size={input_cfg.batch_size} must be divisible by "
                     f"the {process_count} processes")
  local_batch = input_cfg.batch_size // process_count
  video, image = make_sources(input_cfg, seed)
  streams, weights = [], []
  for i, (source, weight) in enumerate(((video, input_cfg.video_ratio),
                                        (image, 1.0 - input_cfg.video_ratio))):
    if source is not None and weight > 0:
      streams.append(_batched_stream(source, batch_size=local_batch, seed=seed + 7919 * i,
                                     process_index=process_index, process_count=process_count))
      weights.append(weight)
  ds = streams[0] if len(streams) == 1 else grain.MapDataset.mix(streams, weights=weights)
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=input_cfg.prefetch))
  if input_cfg.num_workers > 0:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=input_cfg.num_workers))
  return it


def eval_videos(input_cfg: ml_collections.ConfigDict, *, seed: int, count: int) -> np.ndarray:
  """A fixed set of held-out clips, uint8 (count, T, H, W, 3)."""
  video, _ = make_sources(_with_video_ratio(input_cfg, 1.0), seed + EVAL_SEED_OFFSET)
  return np.stack([np.asarray(video[i]["frames"], np.uint8) for i in range(count)])


def _with_video_ratio(input_cfg: ml_collections.ConfigDict, ratio: float) -> ml_collections.ConfigDict:
  cfg = ml_collections.ConfigDict(input_cfg.to_dict())
  cfg.video_ratio = ratio
  return cfg


def to_model_input(frames: Any) -> Any:
  """uint8 [0, 255] -> float32 [-1, 1]; done on device inside the step."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  return jnp.asarray(frames, jnp.float32) / 127.5 - 1.0
