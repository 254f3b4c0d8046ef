"""Frame prediction (configs/eval.py:frame_prediction) on the `:tiny` generator (5-frame window)."""
import json
import os

import numpy as np
import pytest

from phenaki_jax.config.schema import ConfigError
from phenaki_jax.data import pipeline
from phenaki_jax.eval import eval_prediction
from phenaki_jax.generator import SamplingOptions
from phenaki_jax.sampling import continuation
from tests.helpers import REPO, load_config

VIDEOS = os.path.join(REPO, "tests", "data", "media", "videos")
OPTS = SamplingOptions(num_steps=4, max_steps=8)


def _config(gen_dir, variant="frame_prediction_tiny", **overrides):
  config = load_config("eval", variant)
  config.generator.workdir = gen_dir
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for part in parents:
      node = node[part]
    node[leaf] = value
  return config


def test_the_report_scores_predictions_of_held_out_built_in_clips(trained, generator, tmp_path):
  report = eval_prediction.run(_config(trained[1]), str(tmp_path))
  saved = json.load(open(report["json_path"]))
  assert os.path.basename(report["json_path"]) == f"frame_prediction_bair_step_{generator.step}.json"
  assert os.path.exists(report["png_path"])
  m = saved["metrics"]
  assert len(m["psnr_per_frame"]) == 4
  for key in ("psnr", "ssim", "lpips", "last_frame_psnr", "last_frame_ssim", "last_frame_lpips"):
    assert np.isfinite(m[key]), key
  # psnr is the mean of per-clip PSNRs over all predicted frames: at most the
  # per-frame mean's largest value, at least its smallest... (Jensen aside, close to it)
  assert min(m["psnr_per_frame"]) - 3 < m["psnr"] < max(m["psnr_per_frame"]) + 3
  p = saved["protocol"]
  assert (p["context_frames"], p["predict_frames"], p["num_clips"], p["samples_per_clip"]) == (
      1, 4, 4, 1)
  assert p["resolved"]["windows"] == [{"context_frames": 1, "new_frames": 4}]
  assert p["resolved"]["sampling"]["num_steps"] == 4
  assert p["resolved"]["preset"]["changed"] == {"predict_frames": {"preset": 15, "here": 4},
                                                "resolution": {"preset": 64, "here": 16}}
  assert saved["clips"]["held_out"] and saved["clips"]["clips"].startswith("held out: ")
  assert any("changed from the 'bair' preset" in w for w in saved["warnings"])
  assert "FVD not computed (protocol.fvd=False)" in saved["warnings"]


def test_predictions_are_the_generators_continuations_under_the_documented_seeds(
    trained, generator, monkeypatch, tmp_path):
  """Sample s of clip i, window w: seed + (w·S + s)·N + i; the scores are of those frames."""
  made = []
  original = continuation.continue_video

  def spy(gen, prompts, start, total, **kw):
    out = original(gen, prompts, start, total, **kw)
    made.append((list(prompts), start, out, kw["seed"], kw["seed_stride"]))
    return out

  monkeypatch.setattr(continuation, "continue_video", spy)
  config = _config(trained[1], **{"protocol.samples_per_clip": 2, "protocol.num_clips": 3})
  report = eval_prediction.run(config, str(tmp_path))
  clips, captions = pipeline.eval_clips(eval_prediction.clip_input(config, generator)[0],
                                        seed=0, count=3)
  # 2 samples x 2 batches (of 2; the second padded); seeds by the formula.
  assert [(seed, stride) for *_, seed, stride in made] == [(0, 6), (2, 6), (3, 6), (5, 6)]
  for prompts, start, out, seed, _ in made:
    first = seed % 3
    np.testing.assert_array_equal(start[:len(clips) - first], clips[first:first + 2, :1])
    assert prompts[:len(clips) - first] == captions[first:first + 2]
  one = generator.continue_from([captions[1]], clips[1, :1], seed=3 + 1,
                                options=SamplingOptions(num_steps=4, max_steps=8))
  np.testing.assert_array_equal(made[2][2][1], one[0])  # clip 1, sample 1: seed 3 + 1
  # PSNR of what was made, against the real frames, averaged as the report says.
  preds = np.concatenate([made[0][2], made[1][2][:1], made[2][2], made[3][2][:1]])
  real = np.concatenate([clips, clips])
  err = (real[:, 1:].astype(np.float64) / 255 - preds[:, 1:] / 255) ** 2
  psnr = 10 * np.log10(1 / err.reshape(6, -1).mean(-1))
  assert report["metrics"]["psnr"] == pytest.approx(psnr.mean(), abs=1e-3)


def test_a_rollout_goes_on_from_the_last_frames_of_each_window(generator):
  clips = pipeline.eval_videos(pipeline._with_video_ratio(generator.config.input, 1.0),
                               seed=0, count=2)
  plan = continuation.window_plan(generator, 1, 10)
  assert plan == [(1, 4), (3, 2), (3, 2), (3, 1)]  # 1 + 4 + 2 + 2 + 1 = 10
  prompts = ["a red circle moves left", "a blue square moves up"]
  video = continuation.continue_video(generator, prompts, clips[:, :1], 10, seed=7,
                                      options=OPTS)
  assert video.shape == (2, 10, 16, 16, 3)
  np.testing.assert_array_equal(video[:, :1], clips[:, :1])
  first = generator.continue_from(prompts, clips[:, :1], seed=7, options=OPTS)
  np.testing.assert_array_equal(video[:, :5], first)
  second = generator.continue_from(prompts, video[:, 2:5], seed=7 + 2, options=OPTS,
                                   include_start=False)
  np.testing.assert_array_equal(video[:, 5:7], second)


def test_a_protocol_longer_than_the_window_is_refused_naming_both_counts(trained, tmp_path):
  with pytest.raises(ConfigError, match=r"1 \+ 8 = 9 frames.*makes 5-frame clips.*>= 9 "
                                        r"frames, or set protocol.rollout=True"):
    eval_prediction.run(_config(trained[1], **{"protocol.predict_frames": 8}), str(tmp_path))
  with pytest.raises(ConfigError, match=r"protocol.resolution=64: the generator's frames are "
                                        r"16x16"):
    eval_prediction.run(_config(trained[1], **{"protocol.resolution": 64}), str(tmp_path))
  with pytest.raises(ConfigError, match=r"protocol.context_frames=2: .* one of \[1, 3\]"):
    eval_prediction.run(_config(trained[1], **{"protocol.context_frames": 2}), str(tmp_path))
  with pytest.raises(ConfigError, match=r"protocol.predict_frames=4: FVD of the predicted "
                                        r"frames needs >= 9"):
    eval_prediction.run(_config(trained[1], **{"protocol.fvd": True}), str(tmp_path))
  assert not os.listdir(tmp_path)


def test_real_clips_from_a_folder_skip_what_is_too_short(trained, tmp_path):
  # At 2 fps the three real videos hold 4 (arm_wrestling, 2 s), 6 and 14 frames:
  # the 5-frame protocol has two clips, and names the short one.
  config = _config(trained[1], folder=VIDEOS, **{"protocol.num_clips": 2, "protocol.fps": 2.0})
  report = eval_prediction.run(config, str(tmp_path))
  assert report["clips"]["data"] == "folder" and report["clips"]["files"] == 3
  assert {s["file"] for s in report["clips"]["skipped"]} <= {"arm_wrestling_2s.mp4"}
  assert np.isfinite(report["metrics"]["psnr"])
  with pytest.raises(ConfigError, match=r"protocol.num_clips=3: the folder .* gave 2 clip\(s\) "
                                        r"of 5 frames \(1 file\(s\) skipped\)"):
    eval_prediction.run(_config(trained[1], folder=VIDEOS, **{"protocol.num_clips": 3,
                                                               "protocol.fps": 2.0}),
                        str(tmp_path / "again"))


# --- The presets, on a generator whose 17-frame window at 64x64 holds both (slow: I3D).

@pytest.fixture(scope="module")
def window_of_17_at_64(tmp_path_factory):
  """A generator workdir: tiny widths, 16-px patches (9 x 4 x 4 tokens), 1 step each."""
  from phenaki_jax.config import sizes
  from phenaki_jax.train import train_cvivit, train_maskgit
  clip = (17, 64)
  tok_dir = str(tmp_path_factory.mktemp("tokenizer_17x64"))
  config = load_config("cvivit", "tiny,l2vq")
  config.input.num_frames, config.input.resolution = clip
  config.model.patch_size = 16
  config.total_steps, config.checkpoint_every_steps, config.eval_every_steps = 1, 1, 0
  train_cvivit.train_and_evaluate(config, tok_dir)
  gen_dir = str(tmp_path_factory.mktemp("generator_17x64"))
  config = load_config("maskgit", "tiny")
  config.tokenizer.workdir = tok_dir
  config.input.num_frames, config.input.resolution = clip
  config.model.update(sizes.generator_model(dict(sizes.TOKENIZER["tiny"], patch_size=16), clip,
                                            sizes.GENERATOR["tiny"]))
  config.total_steps, config.eval_every_steps, config.checkpoint_every_steps = 1, 0, 1
  train_maskgit.train_and_evaluate(config, gen_dir)
  return gen_dir


@pytest.mark.slow  # ~2 min: I3D at 224 px compiles for 16, 15 and 11 frames
@pytest.mark.parametrize("preset,predicted", [("bair", 15), ("kinetics", 11)])
def test_each_preset_reports_fvd_of_whole_clips_and_of_predicted_frames(
    window_of_17_at_64, preset, predicted, tmp_path):
  config = _config(window_of_17_at_64, f"frame_prediction,{preset}",
                   **{"protocol.num_clips": 4, "batch_size": 4, "num_grid_clips": 1,
                      "sampling.num_steps": 2, "sampling.max_steps": 2})
  report = eval_prediction.run(config, str(tmp_path))
  m, p = report["metrics"], report["protocol"]
  assert np.isfinite(m["fvd"]) and np.isfinite(m["fvd_predicted"]) and m["fvd"] >= 0
  assert m["fvd_clips"] == {"predicted": 4, "real": 4}
  assert len(m["psnr_per_frame"]) == predicted
  assert p["resolved"]["i3d"]["fvd_num_frames"] == {"fvd": 16, "fvd_predicted": predicted}
  assert p["resolved"]["windows"] == [{"context_frames": 16 - predicted,
                                       "new_frames": predicted}]
  assert p["resolved"]["preset"]["changed"] == {}
  assert "fvd: the whole clips" in p["resolved"]["fvd_reported"]
  assert any("FVD from 4 real clips" in w for w in report["warnings"])
  assert os.path.basename(report["json_path"]).startswith(f"frame_prediction_{preset}_step_1")
