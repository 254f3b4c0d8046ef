"""Stories on a `:tiny` generator (window 5 frames = 3 token frames, temporal patch 2)."""
import dataclasses
import json

import jax
import numpy as np
import pytest

from phenaki_jax import storage
from phenaki_jax.config import schema
from phenaki_jax.data import video_io
from phenaki_jax.generator import SamplingOptions
from phenaki_jax.sampling import sample as sample_job
from phenaki_jax.sampling import story
from tests.helpers import load_config

OPTS = SamplingOptions(num_steps=3, max_steps=8)


def _run(generator, segments, **kw):
  frames = []
  result = story.generate_story(generator, segments, sink=frames.append, options=OPTS, **kw)
  return np.concatenate(frames), result


def test_segments_make_the_frames_asked_for(generator):
  segments = story.parse_segments([
      {"prompt": "a large red circle moves right", "num_frames": 7},
      {"prompt": "the red circle moves up", "num_frames": 3},
      {"prompt": "the red circle moves left"},  # one window: 5 - 3 context = 2 new frames
      {"prompt": "the red circle stays still", "num_frames": 4, "context_frames": 1},
  ])
  video, result = _run(generator, segments, context_frames=3)
  assert video.shape == (16, 16, 16, 3) and result.num_frames == 16
  bounds = [(s["start_frame"], s["end_frame"]) for s in result.segments]
  assert bounds == [(0, 7), (7, 10), (10, 12), (12, 16)]
  # 7 frames: a fresh window of 5, then one of 2 new after 3 context frames.
  assert [s["windows"] for s in result.segments] == [2, 2, 1, 1]


def test_one_segment_is_plain_sampling(generator):
  video, _ = _run(generator, [story.Segment("a large red circle moves right", seed=5)])
  plain = generator.generate(["a large red circle moves right"], seed=5, options=OPTS)[0]
  np.testing.assert_array_equal(video, plain)


def test_the_context_is_the_frozen_prefix_of_the_next_window(generator, monkeypatch):
  prefixes = []
  original = generator.sample_tokens

  def spy(prompts, **kw):
    out = original(prompts, **kw)
    if kw.get("prefix_tokens") is not None:
      prefixes.append((kw["prefix_tokens"], out))
    return out

  monkeypatch.setattr(generator, "sample_tokens", spy)
  frames = []
  story.generate_story(generator, story.parse_segments(["a small blue square", "the blue "
                                                        "square moves up"]),
                       sink=frames.append, options=OPTS, context_frames=3)
  video = np.concatenate(frames)
  (prefix, tokens), = prefixes
  # The prefix is the tokenizer's code of the last 3 frames written, kept unchanged.
  np.testing.assert_array_equal(prefix, np.asarray(generator.tokenizer.encode(video[2:5][None])))
  np.testing.assert_array_equal(tokens[:, :2], prefix)


def test_same_storyboard_and_seeds_same_video_other_seed_other(generator):
  segments = story.parse_segments(["a large red circle moves right", "the red circle moves up"])
  a, _ = _run(generator, segments, seed=1)
  b, _ = _run(generator, segments, seed=1)
  c, _ = _run(generator, segments, seed=2)
  np.testing.assert_array_equal(a, b)
  assert (a != c).any()


def test_twenty_segments_keep_device_memory_flat(generator):
  live = []
  frames = []
  segments = story.parse_segments([f"the red circle moves {d}" for d in
                                   ("left", "up", "right", "down") * 5])
  story.generate_story(generator, segments, sink=frames.append, options=OPTS,
                       context_frames=3, on_segment=lambda i, f: live.append(
                           (len(jax.live_arrays()), sum(a.nbytes for a in jax.live_arrays()))))
  assert sum(len(f) for f in frames) == 5 + 19 * 2
  # After the first windows compiled and cached what they need, nothing grows.
  assert live[2:] == [live[2]] * (len(live) - 2), live


def test_storyboards_from_yaml_and_json_and_their_errors(tmp_path):
  (tmp_path / "s.yaml").write_text(
      "defaults: {context_frames: 1, guidance_scale: 2.0}\n"
      "segments:\n  - prompt: a small red square\n    num_frames: 9\n"
      "  - {prompt: the red square moves up, seed: 3}\n")
  segs = story.load_storyboard(str(tmp_path / "s.yaml"))
  assert segs == [story.Segment("a small red square", num_frames=9, context_frames=1,
                                guidance_scale=2.0),
                  story.Segment("the red square moves up", context_frames=1,
                                guidance_scale=2.0, seed=3)]
  (tmp_path / "s.json").write_text(json.dumps(["one", {"prompt": "two", "seconds": 1.5}]))
  assert story.load_storyboard(str(tmp_path / "s.json"))[1].seconds == 1.5
  (tmp_path / "bad.yaml").write_text("segments:\n  - {prompt: x, frames: 3}\n")
  with pytest.raises(ValueError, match=r"segment 0 has unknown key\(s\) \['frames'\]"):
    story.load_storyboard(str(tmp_path / "bad.yaml"))
  (tmp_path / "empty.yaml").write_text("segments: []\n")
  with pytest.raises(ValueError, match="no segments"):
    story.load_storyboard(str(tmp_path / "empty.yaml"))


def test_a_context_that_does_not_tokenise_to_whole_frames_is_refused(generator):
  with pytest.raises(ValueError, match=r"context_frames=2.*one of \[1, 3\]"):
    _run(generator, story.parse_segments(["a", "b"]), context_frames=2)


def test_story_job_writes_mp4_gif_strip_and_boundaries_from_and_to_a_bucket(trained, bucket):
  """A storyboard in a bucket, the story written there (the local path: the story tests below)."""
  storyboard = f"{bucket}/boards/story.yaml"
  storage.write_text(storyboard, "defaults: {context_frames: 3}\nsegments:\n"
                     "  - a large red circle moves right\n  - the red circle moves up\n"
                     "  - the red circle moves left\n")
  config = load_config("sample", "tiny")
  config.generator.workdir = trained[1]
  config.storyboard = storyboard
  config.story_defaults.context_frames = 3
  config.output.formats = "mp4,gif"
  out = f"{bucket}/story"
  sample_job.run(config, out)
  report = storage.read_json(f"{out}/story.json")
  assert report["num_frames"] == 5 + 2 + 2
  assert [(s["start_frame"], s["end_frame"]) for s in report["segments"]] == [(0, 5), (5, 7),
                                                                              (7, 9)]
  assert all("shapes" in s for s in report["segments"])  # shapes prompts are scored
  with storage.local_copy(f"{out}/story.mp4") as mp4:
    assert video_io.read_video(mp4, fps=None).shape == (9, 16, 16, 3)
  assert report["files"] == ["story.mp4", "story.gif"]
  assert storage.listdir(out) == ["story.gif", "story.json", "story.mp4", "story.png"]
  assert storage.size(f"{out}/story.gif") > 0 and storage.size(f"{out}/story.png") > 0


def test_bad_story_settings_fail_before_loading(trained, tmp_path, bucket):
  config = load_config("sample", "tiny")
  config.generator.workdir = trained[1]
  config.storyboard = str(tmp_path / "missing.yaml")
  with pytest.raises(schema.ConfigError, match="config.storyboard"):
    sample_job.run(config, str(tmp_path / "a"))
  config.storyboard = f"{bucket}/missing.yaml"  # not in the bucket: named
  with pytest.raises(schema.ConfigError,
                     match=f"config.storyboard='{bucket}/missing.yaml': no such file"):
    sample_job.run(config, str(tmp_path / "a"))
  (tmp_path / "bad.yaml").write_text("segments:\n  - {prompt: x, frames: 3}\n")
  config.storyboard = str(tmp_path / "bad.yaml")
  with pytest.raises(schema.ConfigError, match="config.storyboard: .*frames"):
    sample_job.run(config, str(tmp_path / "b"))


# --- Experimental switches: long-term memory and seam blending (off by default).

STORY = ["a large red circle moves right", "the red circle moves up", "the red circle moves left"]


def _spy(generator, monkeypatch):
  calls = []
  original = generator.sample_tokens

  def spy(prompts, **kw):
    out = original(prompts, **kw)
    calls.append((kw, out))
    return out

  monkeypatch.setattr(generator, "sample_tokens", spy)
  return calls


def test_memory_is_the_first_windows_first_token_frame_for_every_later_window(
    memory_generator, monkeypatch):
  assert memory_generator.memory_token_frames == 1
  calls = _spy(memory_generator, monkeypatch)
  segments = story.parse_segments(STORY, {"num_frames": 4})
  memory_opts = dataclasses.replace(OPTS, memory_guidance_scale=2.0)
  frames = []
  result = story.generate_story(memory_generator, segments, sink=frames.append,
                                options=memory_opts, context_frames=3, seed=1)
  (first_kw, first_tokens), *later = calls
  # 4 new frames: one window (of 5) for the first segment, two (2 new each) for the others.
  assert first_kw["memory_tokens"] is None and len(later) == 4
  for kw, _ in later:
    np.testing.assert_array_equal(kw["memory_tokens"], first_tokens[:, :1])
  assert sum(len(f) for f in frames) == result.num_frames == 12
  assert [s["memory_guidance_scale"] for s in result.segments] == [2.0] * 3
  # Same seeds, same story; the memory changes it; scale 0 gives no memory at all.
  again, _ = _run_with(memory_generator, segments, memory_opts)
  np.testing.assert_array_equal(np.concatenate(frames), again)
  calls.clear()
  plain, _ = _run_with(memory_generator, segments, OPTS)
  assert all(kw["memory_tokens"] is None for kw, _ in calls)
  assert plain.shape == again.shape and (plain != again).any()
  np.testing.assert_array_equal(plain[:4], again[:4])  # the first window has no memory


def _run_with(generator, segments, options, **kw):
  frames = []
  kw.setdefault("context_frames", 3)
  kw.setdefault("seed", 1)
  result = story.generate_story(generator, segments, sink=frames.append, options=options, **kw)
  return np.concatenate(frames), result


def test_memory_needs_a_generator_trained_with_it(generator):
  written = []
  with pytest.raises(ValueError, match=r"segment 1 .*memory_guidance_scale=1.0.*"
                                       r"memory_token_frames=0"):
    story.generate_story(generator, story.parse_segments(
        ["a", {"prompt": "b", "memory_guidance_scale": 1.0}]), sink=written.append,
        options=OPTS)
  assert not written  # refused before the first window
  with pytest.raises(ValueError, match="no long-term memory"):
    generator.sample_tokens(["a"], options=OPTS, memory_tokens=np.zeros((1, 1, 4, 4), np.int32))


def test_seam_blending_story_keeps_frame_counts_and_is_deterministic(generator, monkeypatch):
  segments = story.parse_segments(STORY, {"num_frames": 4})
  blend = dataclasses.replace(OPTS, seam_blending=True)
  plain, _ = _run_with(generator, segments, OPTS)
  a, result = _run_with(generator, segments, blend)
  b, _ = _run_with(generator, segments, blend)
  np.testing.assert_array_equal(a, b)
  assert a.shape == plain.shape == (12, 16, 16, 3)
  assert [s["seam_blending"] for s in result.segments] == [True] * 3
  np.testing.assert_array_equal(a[:4], plain[:4])  # the first window has no prefix to blend
  assert (a != plain).any()
  # Per segment: only the segment that asks for it blends.
  calls = _spy(generator, monkeypatch)
  _run_with(generator, story.parse_segments(
      [STORY[0], {"prompt": STORY[1], "seam_blending": True}]), OPTS)
  assert [kw["options"].seam_blending for kw, _ in calls] == [False, True]


def test_storyboards_set_the_switches_as_defaults_and_per_segment(tmp_path):
  (tmp_path / "s.yaml").write_text(
      "defaults: {memory_guidance_scale: 1.5, seam_blending: true}\n"
      "segments:\n  - a small red square\n"
      "  - {prompt: the red square moves up, seam_blending: false, memory_guidance_scale: 0}\n")
  first, second = story.load_storyboard(str(tmp_path / "s.yaml"))
  assert (first.memory_guidance_scale, first.seam_blending) == (1.5, True)
  assert (second.memory_guidance_scale, second.seam_blending) == (0, False)
  assert story.Segment("x").memory_guidance_scale is None  # None: the story's options


def test_story_job_takes_the_switches_from_the_sampling_keys(memory_trained, tmp_path):
  config = load_config("sample", "tiny")
  config.generator.workdir = memory_trained
  config.story = ";".join(STORY)
  config.story_defaults.context_frames = 3
  config.sampling.memory_guidance_scale = 1.5
  config.sampling.seam_blending = True
  config.output.formats = "mp4"
  report = sample_job.run(config, str(tmp_path / "story"))
  assert report["num_frames"] == 9
  assert report["sampling"]["memory_guidance_scale"] == 1.5
  assert all(s["seam_blending"] and s["memory_guidance_scale"] == 1.5
             for s in report["segments"])
  defaults = schema.sample_defaults()
  assert (defaults.sampling.memory_guidance_scale, defaults.sampling.seam_blending) == (0.0,
                                                                                         False)


def test_a_context_longer_than_the_video_so_far_shrinks_to_what_it_holds(generator, monkeypatch):
  """After 2 frames, K = 3 cannot be had: the window takes 1 frame and drops only that."""
  calls = _spy(generator, monkeypatch)
  video, result = _run(generator, story.parse_segments([
      {"prompt": "a small blue square", "num_frames": 2},
      {"prompt": "the blue square moves up", "num_frames": 6}]), context_frames=3)
  # Then, 6 frames in, the next window has its 3.
  assert video.shape[0] == 8 and result.segments[1]["window_contexts"] == [1, 3]
  _, (kw, second), _ = calls
  np.testing.assert_array_equal(kw["prefix_tokens"],
                                np.asarray(generator.tokenizer.encode(video[1:2][None])))
  # The new frames are the window's frames after its one context frame.
  np.testing.assert_array_equal(video[2:6], generator.decode(second)[0][1:5])


def test_a_cut_ends_the_history_the_next_context_is_taken_from(generator, monkeypatch):
  calls = _spy(generator, monkeypatch)
  video, result = _run(generator, story.parse_segments([
      "a small blue square",
      {"prompt": "a large red circle", "num_frames": 1, "context_frames": 0},
      {"prompt": "the red circle moves up", "num_frames": 2}]), context_frames=3)
  assert video.shape[0] == 5 + 1 + 2
  kw, _ = calls[2]
  # Only the cut segment's one frame is context, not the frames before the cut.
  np.testing.assert_array_equal(kw["prefix_tokens"],
                                np.asarray(generator.tokenizer.encode(video[5:6][None])))
  assert result.segments[2]["window_contexts"] == [1]
