"""Image-to-video and continuation on the `:tiny` generator (5-frame window, starts of 1 or 3)."""
import os

import numpy as np
import pytest

from phenaki_jax.data import video_io
from phenaki_jax.generator import SamplingOptions
from phenaki_jax.sampling import start as start_lib
from tests.helpers import REPO

MEDIA = os.path.join(REPO, "tests", "data", "media")
IMAGE = os.path.join(MEDIA, "images", "chelsea.png")
VIDEO = os.path.join(MEDIA, "videos", "arm_wrestling_2s.mp4")
OPTS = SamplingOptions(num_steps=3, max_steps=8)
PROMPTS = ["a large red circle moves right", "a small blue square moves up"]


def _prefixes(generator, monkeypatch):
  calls = []
  original = generator.sample_tokens

  def spy(prompts, **kw):
    out = original(prompts, **kw)
    calls.append((kw.get("prefix_tokens"), out))
    return out

  monkeypatch.setattr(generator, "sample_tokens", spy)
  return calls


def test_an_image_opens_the_video_and_is_its_frozen_first_token_frame(generator, monkeypatch):
  start = start_lib.load_start(IMAGE, generator, context_frames=3, fps=8)
  assert start.kind == "image" and start.frames.shape == (1, 16, 16, 3)
  np.testing.assert_array_equal(start.frames, video_io.read_image(IMAGE, resolution=16))
  calls = _prefixes(generator, monkeypatch)
  videos = generator.continue_from(PROMPTS, start.frames, seed=0, options=OPTS)
  assert videos.shape == (2, 5, 16, 16, 3)
  np.testing.assert_array_equal(videos[:, 0], np.repeat(start.frames, 2, axis=0))
  (prefix, tokens), = calls
  want = np.asarray(generator.tokenizer.encode(np.repeat(start.frames[None], 2, axis=0)))
  np.testing.assert_array_equal(prefix, want)
  np.testing.assert_array_equal(tokens[:, :1], want)  # kept as given
  # Without the start: only the generated frames, the same ones.
  new = generator.continue_from(PROMPTS, start.frames, seed=0, options=OPTS,
                                include_start=False)
  np.testing.assert_array_equal(new, videos[:, 1:])


def test_a_video_gives_its_last_frames_at_the_generators_rate(generator, monkeypatch):
  start = start_lib.load_start(VIDEO, generator, context_frames=3, fps=8)
  assert start.kind == "video"
  np.testing.assert_array_equal(start.frames,
                                video_io.read_video(VIDEO, fps=8, resolution=16)[-3:])
  calls = _prefixes(generator, monkeypatch)
  videos = generator.continue_from(PROMPTS[:1], start.frames, seed=3, options=OPTS)
  np.testing.assert_array_equal(videos[0, :3], start.frames)
  (prefix, tokens), = calls
  assert prefix.shape[1] == 2  # 3 frames: 1 + (3 - 1) / 2 token frames
  np.testing.assert_array_equal(tokens[:, :2], prefix)
  # One start per prompt works too.
  both = generator.continue_from(PROMPTS, np.stack([start.frames, start.frames[::-1]]),
                                 seed=3, options=OPTS)
  np.testing.assert_array_equal(both[1, :3], start.frames[::-1])


def test_a_video_shorter_than_asked_starts_from_what_it_holds(generator, caplog):
  # 2 s at 1 fps: 2 frames, so the 3 asked for become the one start length that fits.
  start = start_lib.load_start(VIDEO, generator, context_frames=3, fps=1)
  assert start.frames.shape[0] == 1
  assert "fewer than the 3 asked for; starting from the last 1" in caplog.text


def test_bad_starts_are_refused_naming_the_file_or_what_fits(generator):
  bad = os.path.join(MEDIA, "bad", "corrupted.mp4")
  with pytest.raises(ValueError, match=r"config.start='.*corrupted.mp4': cannot be read"):
    start_lib.load_start(bad, generator, context_frames=3, fps=8)
  with pytest.raises(ValueError, match=r"config.start='.*missing.png': cannot be read"):
    start_lib.load_start(os.path.join(MEDIA, "missing.png"), generator, context_frames=3, fps=8)
  frames = video_io.read_video(VIDEO, fps=8, resolution=16)
  with pytest.raises(ValueError, match=r"a start of 2 frames: .* one of \[1, 3\] frames"):
    generator.continue_from(PROMPTS, frames[:2], options=OPTS)
  with pytest.raises(ValueError, match=r"start frames uint8 \(2, 1, 32, 32, 3\): expected"):
    generator.continue_from(PROMPTS, video_io.read_image(IMAGE, resolution=32), options=OPTS)
  assert generator.start_lengths() == [1, 3] and generator.trained_to_continue


# --- The sample job's config.start, for separate videos and for a story.

def _job(gen_dir, **overrides):
  from tests.sampling.sample_test import _sample_config
  return _sample_config(gen_dir, **{"output.formats": "mp4", **overrides})


def test_the_sample_job_starts_every_video_from_an_image(trained, tmp_path):
  from phenaki_jax.sampling import sample as sample_job
  report = sample_job.run(_job(trained[1], start=IMAGE), str(tmp_path))
  assert report["start"] == {"path": IMAGE, "kind": "image", "frames": 1, "in_output": True}
  first = video_io.read_image(IMAGE, resolution=16)[0].astype(int)
  for record in report["samples"]:
    video = video_io.read_video(str(tmp_path / record["files"][0]), fps=None)
    assert video.shape == (5, 16, 16, 3)
    assert np.abs(video[0].astype(int) - first).mean() < 8  # the image, through mp4
  # Left out of the output: only the 4 new frames.
  report = sample_job.run(_job(trained[1], start=IMAGE, start_in_output=False),
                          str(tmp_path / "without"))
  assert report["samples"][0]["frames"][0] == 4


def test_a_storyboard_goes_on_from_its_start_video(trained, tmp_path):
  from phenaki_jax.sampling import sample as sample_job
  board = tmp_path / "board.yaml"
  os.symlink(VIDEO, tmp_path / "clip.mp4")
  board.write_text("start: clip.mp4\nsegments:\n  - {prompt: a small blue square moves up, "
                   "num_frames: 2}\n")
  report = sample_job.run(_job(trained[1], storyboard=str(board), **{
      "story_defaults.context_frames": 3}), str(tmp_path / "out"))
  assert report["start"]["path"] == str(tmp_path / "clip.mp4")
  assert report["start"]["frames"] == 3 and report["num_frames"] == 3 + 2
  assert report["segments"][0]["start_frame"] == 3
  assert report["segments"][0]["window_contexts"] == [3]
  with pytest.raises(Exception, match="both set one"):
    sample_job.run(_job(trained[1], storyboard=str(board), start=IMAGE), str(tmp_path / "x"))


def test_start_config_errors_name_the_key(trained, tmp_path):
  from phenaki_jax.config.schema import ConfigError
  from phenaki_jax.sampling import sample as sample_job
  with pytest.raises(ConfigError, match="config.num_frames=1: a start"):
    sample_job.run(_job(trained[1], start=IMAGE, num_frames=1), str(tmp_path))
  with pytest.raises(ConfigError, match=r"config.start='.*corrupted.mp4': cannot be read"):
    sample_job.run(_job(trained[1], start=os.path.join(MEDIA, "bad", "corrupted.mp4")),
                   str(tmp_path))
  assert not os.listdir(tmp_path)  # nothing written before the refusal
