"""The tokenizer trains on real clips prepared into shards, mixed 80/20 with images."""
import os

import numpy as np
import pytest

from phenaki_jax.config import schema
from phenaki_jax import metrics
from phenaki_jax.data import pipeline
from phenaki_jax.train import train_cvivit
from tests.helpers import load_config, prepare_media

@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("prepared"))
  return out, prepare_media(out)


def _shard_config(prepared_dir, **input_overrides):
  config = load_config("cvivit", "tiny,l2vq")
  config.input.data = "shards"
  config.input.video_shards = prepared_dir
  config.input.image_shards = prepared_dir
  for k, v in input_overrides.items():
    config.input[k] = v
  return config


def test_broken_files_reported_and_good_ones_all_prepared(prepared):
  _, summary = prepared
  skipped = {os.path.basename(s["path"]) for s in summary["skipped_files"]}
  assert {"corrupted.mp4", "truncated.mp4", "empty.mp4", "not_a_video.mp4",
          "missing_file.mp4"} <= skipped
  assert summary["video_files"] == 3 and summary["image_files"] == 3
  assert summary["video_clips"] > 0 and summary["image_clips"] == 3


def test_mix_holds_on_real_shards(prepared):
  config = schema.complete(_shard_config(prepared[0]))
  it = iter(pipeline.make_train_dataset(config.input, seed=0))
  videos = images = 0
  while videos + images < 1000:
    frames = next(it)["frames"]
    if frames.shape[1] == 5:
      videos += len(frames)
    else:
      images += len(frames)
  assert abs(videos / (videos + images) - 0.8) <= 0.008


def test_tokenizer_trains_on_real_shards(prepared, tmp_path):
  config = _shard_config(prepared[0], random_crop_min_scale=0.7, horizontal_flip=True)
  config.total_steps = 5
  config.checkpoint_every_steps = 5
  out = train_cvivit.train_and_evaluate(config, str(tmp_path))
  assert out["step"] == 5
  rows = metrics.read_jsonl(os.path.join(tmp_path, "metrics.jsonl"))
  losses = [r["train/loss"] for r in rows if "train/loss" in r]
  assert len(losses) == 5 and all(np.isfinite(losses))
  assert any("train/video/l2" in r for r in rows) and any("train/image/l2" in r for r in rows)


def test_mismatched_shards_are_named(prepared, tmp_path):
  config = _shard_config(prepared[0])
  config.input.resolution = 32
  config.input.video_ratio = 1.0
  with pytest.raises(ValueError, match="video shards .* shape .*config.input.num_frames"):
    train_cvivit.train_and_evaluate(config, str(tmp_path))


def test_augmentation_is_consistent_across_frames_and_deterministic():
  clip = np.zeros((5, 16, 16, 3), np.uint8)
  clip[:, :, :4] = 255  # a bright band on the left of every frame
  aug = pipeline.ClipAugment(min_scale=0.6, flip=True)
  outs = [aug.random_map({"frames": clip}, np.random.default_rng(s))["frames"] for s in range(20)]
  for out in outs:
    assert out.shape == clip.shape
    for f in range(1, 5):  # every frame got the same crop and flip
      np.testing.assert_array_equal(out[f], out[0])
  left_bright = [o[0, :, 0].mean() > 128 for o in outs]
  assert any(left_bright) and not all(left_bright)  # flips happen, not always
  again = aug.random_map({"frames": clip}, np.random.default_rng(3))["frames"]
  np.testing.assert_array_equal(again, outs[3])
