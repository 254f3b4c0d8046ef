"""The grain pipeline: measured video/image mix, exact resume, per-process split."""
import hashlib

import numpy as np
import pytest

from phenaki_jax.config import schema
from phenaki_jax.data import pipeline
from tests.helpers import load_config


def _input_cfg(**overrides):
  config = schema.complete(load_config("cvivit", "tiny"))
  with config.unlocked():
    for k, v in overrides.items():
      config.input[k] = v
  return config.input


@pytest.mark.parametrize("ratio", [0.8, 0.5, 0.3])
def test_measured_video_image_ratio(ratio):
  cfg = _input_cfg(video_ratio=ratio, batch_size=8)
  it = iter(pipeline.make_train_dataset(cfg, seed=0))
  videos = images = 0
  while videos + images < 1000:
    frames = next(it)["frames"]
    assert frames.dtype == np.uint8
    if frames.shape[1] == cfg.num_frames:
      videos += frames.shape[0]
    else:
      assert frames.shape[1:] == (1, cfg.resolution, cfg.resolution, 3)
      images += frames.shape[0]
  measured = videos / (videos + images)
  # Deterministic interleave: exact up to one batch.
  assert abs(measured - ratio) <= 8 / 1000, measured


def test_only_videos_and_only_images():
  for ratio, frames in ((1.0, 5), (0.0, 1)):
    it = iter(pipeline.make_train_dataset(_input_cfg(video_ratio=ratio), seed=0))
    assert all(next(it)["frames"].shape[1] == frames for _ in range(10))


def test_iterator_state_resumes_exactly():
  cfg = _input_cfg()
  it = iter(pipeline.make_train_dataset(cfg, seed=3))
  for _ in range(7):
    next(it)
  state = it.get_state()
  expected = [next(it)["frames"] for _ in range(6)]
  fresh = iter(pipeline.make_train_dataset(cfg, seed=3))
  fresh.set_state(state)
  for want in expected:
    np.testing.assert_array_equal(next(fresh)["frames"], want)


def test_seed_changes_order_and_processes_read_disjoint_examples():
  cfg = _input_cfg(video_ratio=1.0, batch_size=8)

  def clip_hashes(seed, index, count):
    it = iter(pipeline.make_train_dataset(cfg, seed=seed, process_index=index, process_count=count))
    out = []
    for _ in range(6):
      out += [hashlib.sha1(c.tobytes()).hexdigest() for c in next(it)["frames"]]
    return out

  p0, p1 = clip_hashes(0, 0, 2), clip_hashes(0, 1, 2)
  assert len(p0) == 24  # local batch = global 8 / 2 processes
  assert not set(p0) & set(p1)
  assert clip_hashes(0, 0, 1) != clip_hashes(1, 0, 1)


def test_eval_videos_are_fixed_and_held_out():
  cfg = _input_cfg(video_ratio=1.0)
  a = pipeline.eval_videos(cfg, seed=0, count=3)
  np.testing.assert_array_equal(a, pipeline.eval_videos(cfg, seed=0, count=3))
  train = next(iter(pipeline.make_train_dataset(cfg, seed=0)))["frames"]
  train_hashes = {c.tobytes() for c in train}
  assert not any(c.tobytes() in train_hashes for c in a)
