"""The grain pipeline: measured video/image mix, exact resume, per-process split."""
import hashlib
import os

import numpy as np
import pytest

from phenaki_jax.config import schema
from phenaki_jax.data import pipeline, prepare, sources
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


# --- Evaluation clips: the eval split of prepared shards, or said to be training clips.

MEDIA = os.path.join(os.path.dirname(__file__), "media")
# Below 0.3 by prepare.eval_key: these two videos (and an image) are held out.
HELD_OUT_VIDEOS = {"arm_wrestling_2s.mp4", "film_countdown_2s.mp4"}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("prepared"))
  config = prepare.default_config()
  config.update(dict(manifest=os.path.join(MEDIA, "manifest.jsonl"), resolution=16, num_frames=5,
                     num_workers=1, progress=False, eval_fraction=0.3))
  prepare.run(config, out)
  return out


def _sources_of(clips, out, split):
  """The source file of each clip, found by its pixels among the split's records."""
  source = sources.ClipShardSource(sources.find_prepared_shards(out, split)["video"],
                                   with_metadata=True)
  by_pixels = {source[i]["frames"].tobytes(): os.path.basename(source[i]["source"])
               for i in range(len(source))}
  return [by_pixels.get(c.tobytes()) for c in clips]


def test_eval_clips_come_from_the_eval_split(prepared):
  cfg = _input_cfg(data="shards", video_shards=prepared, image_shards=prepared)
  description, held_out = pipeline.eval_source(cfg)
  assert held_out and description.startswith(f"held out: the eval split of {prepared}")
  clips, captions = pipeline.eval_clips(cfg, seed=0, count=4)
  assert set(_sources_of(clips, prepared, "eval")) <= HELD_OUT_VIDEOS
  assert len(set(_sources_of(clips, prepared, "eval"))) == 2  # spread over the split
  assert not set(_sources_of(clips, prepared, "train")) - {None}  # no training clip
  assert all(c.startswith(("Two people", "An old black")) for c in captions)
  np.testing.assert_array_equal(pipeline.eval_videos(cfg, seed=5, count=4), clips)
  # Named explicitly: the same split; a path that is not there names the key.
  cfg.eval_shards = prepared
  np.testing.assert_array_equal(pipeline.eval_videos(cfg, seed=0, count=4), clips)
  with pytest.raises(ValueError, match=r"config.eval_protocol.num_clips=100: the evaluation "
                                       r"clips \(held out: .*\) number only \d+"):
    pipeline.eval_videos(cfg, seed=0, count=100, key="config.eval_protocol.num_clips")
  config = schema.complete(load_config("cvivit", "tiny"))
  config.input.update(dict(data="shards", video_shards=prepared, image_shards=prepared,
                           eval_shards=os.path.join(prepared, "nowhere")))
  with pytest.raises(schema.ConfigError, match=r"config.input.eval_shards='.*nowhere': .*nowhere "
                                               "does not exist"):
    schema.validate_cvivit(config, 8)


def test_without_an_eval_split_the_description_says_training_clips(prepared):
  # The shard folder itself (not the prepare output folder): no split beside it.
  train = os.path.join(prepared, "video")
  cfg = _input_cfg(data="shards", video_shards=train, image_shards=train)
  description, held_out = pipeline.eval_source(cfg)
  assert not held_out and description.startswith(f"training clips: the training shards {train}")
  assert "input.eval_shards" in description  # what to set
  clips = pipeline.eval_videos(cfg, seed=0, count=3)
  assert None not in _sources_of(clips, prepared, "train")
  assert pipeline.eval_source(_input_cfg()) == (
      f"held out: built-in shapes from the eval seed stream (seed + {pipeline.EVAL_SEED_OFFSET}), "
      "not the training stream", True)


def test_an_evaluation_job_names_the_data_its_model_trained_on(prepared):
  cfg = _input_cfg(data="shards", video_shards=prepared, image_shards=prepared)
  # Evaluating on the folder the model trained on: its eval split, as a trainer reads.
  assert pipeline.eval_source(cfg, trained=cfg) == pipeline.eval_source(cfg)
  # On other shards than it trained on: all of them are held out.
  trained = _input_cfg(data="shards", video_shards=os.path.join(prepared, "video"))
  description, held_out = pipeline.eval_source(cfg, trained=trained)
  assert held_out and description.startswith(f"held out: other shards ({prepared})")
  clips = pipeline.eval_videos(cfg, seed=0, count=3, trained=trained)
  assert None not in _sources_of(clips, prepared, "train")
