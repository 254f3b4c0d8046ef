"""The generated-video evaluation (configs/eval.py:generated) and report comparison (:compare).

Real I3D on a few 9-frame clips of the real videos in tests/data/media; a
`:tiny` MaskGIT trained here for the checkpoint path; a fake CLIP module (the
real one's parity is tested with it) for the CLIP score plumbing.
"""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from phenaki_jax import storage
from phenaki_jax.config import schema
from phenaki_jax.pretrained import perceptual
from phenaki_jax.data import synthetic, video_io
from phenaki_jax.eval import fvd as fvd_lib
from phenaki_jax.eval import eval_generated, eval_compare
from phenaki_jax.eval import video_sets
from tests.helpers import REPO, load_config, upload_folder

MEDIA = REPO / "tests" / "data" / "media"
MP4S = ("arm_wrestling_2s.mp4", "film_countdown_2s.mp4")


def _config(variant="generated_tiny", **overrides):
  config = load_config("eval", variant)
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for part in parents:
      node = node[part]
    node[leaf] = value
  return config


@pytest.fixture
def fake_clip(monkeypatch, tmp_path):
  """A stand-in phenaki_jax.eval.clip_score with the real module's interface.

  Its score is the mean red level (so it differs between clips), 100·cosine.
  """
  calls = []

  def load_clip(path, merges_path=None, mesh=None):
    return {"path": path, "merges": merges_path}

  def clip_score(bundle, videos, texts, batch_size):
    assert videos.dtype == np.uint8 and videos.ndim == 5 and len(videos) == len(texts)
    calls.append((videos.shape, list(texts)))
    cosine = videos[..., 0].reshape(len(videos), -1).mean(-1) / 255.0
    return {"clip_score": 100.0 * np.maximum(cosine, 0), "cosine": cosine}

  monkeypatch.setattr(eval_generated, "load_clip", load_clip)
  monkeypatch.setattr(eval_generated, "clip_score", clip_score)
  weights = tmp_path / "clip.npz"
  weights.write_bytes(b"fake")
  return str(weights), calls


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  """generated/: two real mp4s, a GIF, two broken files, captions.json;
  reference/: the three real videos and an empty file."""
  root = tmp_path_factory.mktemp("sets")
  gen, ref = root / "generated", root / "reference"
  gen.mkdir()
  ref.mkdir()
  for name in MP4S:
    shutil.copy(MEDIA / "videos" / name, gen / name)
  frames = video_io.read_video(str(MEDIA / "videos" / "arm_wrestling_2s.mp4"), fps=None,
                               resolution=48)[:12]
  video_io.write_gif(str(gen / "wrestling.gif"), frames, fps=8)
  for bad in ("truncated.mp4", "not_a_video.mp4"):
    shutil.copy(MEDIA / "bad" / bad, gen / bad)
  (gen / "captions.json").write_text(json.dumps({
      "arm_wrestling_2s.mp4": "two men arm wrestling", "film_countdown_2s": "a film countdown",
      "wrestling": "arm wrestling, as a GIF"}))
  for name in os.listdir(MEDIA / "videos"):
    shutil.copy(MEDIA / "videos" / name, ref / name)
  shutil.copy(MEDIA / "bad" / "empty.mp4", ref / "empty.mp4")
  return str(gen), str(ref)


def _i3d_features(extractor, clips):
  return np.concatenate([extractor(clips[i:i + extractor.batch_size])
                         for i in range(0, len(clips), extractor.batch_size)])


def test_fvd_of_a_set_against_itself_is_zero_and_grows_with_noise():
  p = video_sets.Protocol.from_config(_config(**{"protocol.resolution": 32}).protocol)
  clips = []
  for name in MP4S:  # 2 non-overlapping 9-frame clips of each real video
    clips += video_sets.cut_clips(video_io.read_video(str(MEDIA / "videos" / name), fps=None),
                                 p, 2)
  clips = np.stack(clips)
  assert clips.shape == (4, 9, 32, 32, 3)
  i3d = eval_generated.I3DLogits(p)
  clean = _i3d_features(i3d, clips)
  rng = np.random.default_rng(0)
  noisy = {s: _i3d_features(i3d, np.clip(clips + rng.normal(0, s, clips.shape), 0, 255)
                            .astype(np.uint8)) for s in (8, 48)}
  scale = np.trace(np.cov(clean, rowvar=False))
  assert fvd_lib.fvd_from_features(clean, clean) == pytest.approx(0.0, abs=1e-9 * scale)
  small, large = (fvd_lib.fvd_from_features(clean, noisy[s]) for s in (8, 48))
  assert 0 < small < large, (small, large)


def test_fvd_repeats_disjoint_and_bootstrap():
  rng = np.random.default_rng(0)
  gen, ref = rng.normal(size=(40, 8)), rng.normal(size=(40, 8)) + 0.5
  p = video_sets.Protocol.from_config(_config(**{"protocol.repeats": 2}).protocol)
  runs, n = eval_generated.fvd_runs(gen, ref, p)
  assert n == 20 and runs == [fvd_lib.fvd_from_features(gen[:20], ref[:20]),
                              fvd_lib.fvd_from_features(gen[20:], ref[20:])]
  p = video_sets.Protocol.from_config(
      _config(**{"protocol.repeats": 3, "protocol.repeat_mode": "bootstrap"}).protocol)
  runs_a, n = eval_generated.fvd_runs(gen, ref, p)
  assert n == 40 and len(runs_a) == 3 and len(set(runs_a)) == 3
  assert eval_generated.fvd_runs(gen, ref, p)[0] == runs_a  # seeded: the same resamples


@pytest.fixture(scope="module")
def folder_report(folders, gcs_emulator):
  """The job on the folders, read from a bucket, its report written there; with the
  fake CLIP (set up by hand: module scope). Local folders: the tests below."""
  bucket = gcs_emulator.create_bucket()
  gen = upload_folder(folders[0], f"{bucket}/sets/generated")
  ref = upload_folder(folders[1], f"{bucket}/sets/reference")
  weights = f"{bucket}/clip.npz"
  storage.write_bytes(weights, b"fake")
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(eval_generated, "load_clip",
                  lambda path, merges_path=None, mesh=None: {"path": path})
    patch.setattr(eval_generated, "clip_score", lambda bundle, videos, texts, bs: {
        "clip_score": np.full(len(videos), 25.0), "cosine": np.full(len(videos), 0.25)})
    config = _config(generated=gen, reference=ref, **{"protocol.resolution": 32,
                                                      "clip.path": weights})
    report = eval_generated.run(config, f"{bucket}/eval")
  return report, config


def test_folder_job_writes_report_with_protocol_skips_and_warnings(folder_report):
  report, config = folder_report
  assert report["json_path"] == config.generated.replace("sets/generated", "eval/report.json")
  saved = storage.read_json(report["json_path"])
  assert saved["job"] == "eval_generated" and saved["name"] == "generated"
  assert (saved["generated"]["path"], saved["reference"]["path"]) == (config.generated,
                                                                      config.reference)
  # The protocol verbatim, and what its -1s resolved to.
  verbatim = {k: v for k, v in saved["protocol"].items() if k != "resolved"}
  assert verbatim == config.protocol.to_dict()
  assert saved["protocol"]["resolved"]["num_frames"] == 9
  assert saved["protocol"]["resolved"]["resolution"] == 32
  # 3 readable generated videos (2 mp4 + the GIF), 1 clip each; 3 real reference videos.
  assert saved["generated"]["clips"] == 3 and saved["reference"]["clips"] == 3
  skipped = {(s["set"], s["file"], s["kind"]) for s in saved["skipped"]}
  assert skipped == {("generated", "truncated.mp4", "truncated"),
                     ("generated", "not_a_video.mp4", "not_a_video"),
                     ("reference", "empty.mp4", "empty")}
  assert any("< 256" in w and "Chong & Forsyth" in w for w in saved["warnings"])
  assert any("truncated.mp4" in w for w in saved["warnings"])
  m = saved["metrics"]
  assert np.isfinite(m["fvd"]) and m["fvd"] > 0 and m["fvd_clips"] == 3
  # Captions from captions.json (by file name or stem), CLIP score per clip.
  captions = {c["name"]: c["caption"] for c in saved["clips"]}
  assert captions == {"arm_wrestling_2s.mp4": "two men arm wrestling",
                      "film_countdown_2s.mp4": "a film countdown",
                      "wrestling.gif": "arm wrestling, as a GIF"}
  assert m["clip_score"] == 25.0 and m["clip_cosine"] == 0.25
  assert saved["clip"]["path"] == config.clip.path
  assert all(c["clip_score"] == 25.0 for c in saved["clips"])
  assert "shapes/all" not in m  # not shapes prompts
  with storage.open_file(report["png_path"]) as f:
    png = Image.open(f)
    assert png.size[0] == 720 and png.size[1] > 100


def test_checkpoint_job_samples_shapes_prompts_and_scores_them(tmp_path, trained, bucket):
  gen_dir = trained[1]  # the session's `:tiny` generator (tests/conftest.py), 3 steps

  # FVD on: the tiny generator's 5-frame clips are too short, said before sampling.
  with pytest.raises(schema.ConfigError,
                     match=r"config.protocol.num_frames=9 .* generated clips have 5"):
    eval_generated.run(_config(generated=gen_dir), str(tmp_path / "e0"))
  # The same MaskGIT workdir copied into a bucket, sampled from there.
  in_bucket = upload_folder(gen_dir, f"{bucket}/generator")
  report = eval_generated.run(_config(generated=in_bucket, **{"protocol.fvd": False,
                                                          "protocol.num_frames": -1}),
                              str(tmp_path / "e1"))
  assert report["generated"]["kind"] == "maskgit" and report["generated"]["step"] == 3
  assert report["generated"]["path"] == in_bucket and report["name"] == "generator"
  assert report["generated"]["clips"] == 4 and report["reference"]["clips"] == 0
  assert report["reference"]["kind"] == "shapes"
  assert any("protocol.fvd=False" in w for w in report["warnings"])
  assert report["protocol"]["resolved"]["num_frames"] == 5
  assert report["protocol"]["resolved"]["resolution"] == 16
  assert "fvd" not in report["metrics"]
  # The built-in benchmark prompts, one per clip, each with its own seed.
  clips = report["clips"]
  assert [c["seed"] for c in clips] == [0, 1, 2, 3]
  assert all(synthetic.parse_caption(c["caption"]) for c in clips)
  assert 0.0 <= report["metrics"]["shapes/all"] <= 1.0
  assert report["metrics"]["shapes/num_clips"] == 4
  # Object area over the dataset's, per clip and averaged by the prompt's size.
  by_size = {}
  for c in clips:
    assert c["shapes_area_ratio"] >= 0.0
    by_size.setdefault(synthetic.parse_caption(c["caption"])["size"], []).append(
        c["shapes_area_ratio"])
  assert by_size and all(report["metrics"][f"shapes/area_ratio_{size}"] == pytest.approx(np.mean(v))
                         for size, v in by_size.items())
  assert os.path.exists(tmp_path / "e1" / "report.png")


def test_story_folder_gets_segment_accuracy_seams_and_per_segment_clip(tmp_path, fake_clip):
  clip_path, calls = fake_clip
  prompts = ["a large red square moves right", "the red square moves down",
             "the red square moves left"]
  motions = [synthetic.parse_caption(p)["motion"] for p in prompts]
  video, captions, starts = synthetic.render_story(motions, 10, 64, seed=3, shape="square",
                                                   colour="red", size="large")
  assert captions == prompts
  story = tmp_path / "story"
  story.mkdir()
  video_io.write_video(str(story / "story.mp4"), video, fps=8)
  ends = starts[1:] + [len(video)]
  segments = [{"index": i, "prompt": p, "start_frame": s, "end_frame": e, "window_starts": [s]}
              for i, (p, s, e) in enumerate(zip(prompts, starts, ends))]
  (story / "story.json").write_text(json.dumps({"files": ["story.mp4"], "window_frames": 10,
                                                "segments": segments}))
  report = eval_generated.run(_config(generated=str(story), **{
      "protocol.fvd": False, "protocol.num_frames": -1, "clip.path": clip_path}),
      str(tmp_path / "out"))
  assert report["protocol"]["resolved"]["num_frames"] == 10  # one window, not the story
  assert report["generated"]["clips"] == 3  # the story's three 10-frame windows
  (s,) = report["stories"]
  assert [seg["prompt"] for seg in s["story"]["segments"]] == prompts
  m = report["metrics"]
  assert m["story/num_stories"] == 1 and m["story/num_segments"] == 3
  assert m["story/segment_colour"] == 1.0
  assert m["story/segment_all"] >= 2 / 3, s  # mp4 at 64 px; the rendered story scores 1
  assert 0.3 < m["story/seam_ratio"] < 3
  # Per-segment CLIP against each segment's own prompt.
  assert [c[1] for c in calls] == [[p] for p in prompts]
  assert all(seg["clip_score"] > 0 for seg in s["story"]["segments"])
  assert "story/clip_score" in m
  assert os.path.exists(tmp_path / "out" / "report.png")


def test_compare_tabulates_reports_and_names_protocol_differences(folder_report, tmp_path):
  report, _ = folder_report
  a = storage.read_json(report["json_path"])
  b = json.loads(json.dumps(a))
  b["name"], b["metrics"]["fvd"] = "other", 123.5
  b["protocol"]["resize"] = "bilinear"
  (tmp_path / "a.json").write_text(json.dumps(a))
  (tmp_path / "b.json").write_text(json.dumps(b))
  proc = subprocess.run(
      [sys.executable, "-m", "phenaki_jax.main", "--config=configs/eval.py:compare",
       f"--workdir={tmp_path / 'cmp'}", f"--config.reports={tmp_path / 'a.json'},"
       f"{tmp_path / 'b.json'}"], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "| metric | generated | other |" in proc.stdout
  assert "| fvd | " in proc.stdout and "123.5" in proc.stdout
  assert "protocol.resize" in proc.stderr  # the log's warning names the field
  table = (tmp_path / "cmp" / "comparison.md").read_text()
  assert "`protocol.resize`" in table and "not comparable" in table
  saved = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
  assert saved["protocol_differences"] == ["protocol.resize"]
  assert [r["name"] for r in saved["reports"]] == ["generated", "other"]
  # The same report twice, read from the bucket, compared into it: nothing to warn about.
  in_bucket = report["json_path"]
  out = storage.dirname(storage.dirname(in_bucket)) + "/cmp2"
  same = eval_compare.run(_config("compare", reports=f"{in_bucket},{in_bucket}"), out)
  assert same["protocol_differences"] == [] and "Same protocol" in same["markdown"]
  assert storage.read_text(f"{out}/comparison.md") == same["markdown"]
  assert [r["path"] for r in storage.read_json(f"{out}/comparison.json")["reports"]] == [
      in_bucket] * 2


@pytest.mark.parametrize("overrides,message", [
    ({"generated": ""}, "config.generated='': is required"),
    ({"generated": "EMPTY"}, "config.generated=.*: the folder holds no video files"),
    ({"generated": "BAD"}, "config.generated: the generated set has no readable video"),
    ({"reference": "BAD"}, "config.reference: the reference set has no readable video"),
    ({"reference": "/nonexistent/ref"}, "config.reference='/nonexistent/ref': no such folder"),
    ({"protocol.resize": "nearest"}, "config.protocol.resize='nearest': must be one of"),
    ({"protocol.num_frames": 5}, "config.protocol.num_frames=5: must be >= 9"),
    ({"protocol.repeat_mode": "halves"}, "config.protocol.repeat_mode='halves'"),
    ({"protocol.num_clips": 0}, "config.protocol.num_clips=0: must be a positive integer"),
    ({"protocol.frame_stride": 4}, r"config.protocol.num_frames=9 with protocol.frame_stride=4 "
                                   "needs 33 frames per clip, but the generated clips have 12"),
    ({"clip.path": "/nonexistent/clip.npz"}, "config.clip.path='/nonexistent/clip.npz': no such"),
])
def test_bad_input_fails_naming_the_key_before_any_network(overrides, message, tmp_path,
                                                           monkeypatch):
  def no_network(*args, **kwargs):
    raise AssertionError("a network was loaded or compiled")
  monkeypatch.setattr(eval_generated, "I3DLogits", no_network)
  monkeypatch.setattr(perceptual, "i3d_variables", no_network)
  (tmp_path / "empty").mkdir()
  bad = tmp_path / "bad"
  bad.mkdir()
  for name in ("truncated.mp4", "not_a_video.mp4", "empty.mp4"):
    shutil.copy(MEDIA / "bad" / name, bad / name)
  good = tmp_path / "good"
  good.mkdir()
  frames = video_io.read_video(str(MEDIA / "videos" / MP4S[0]), fps=None, resolution=24)[:12]
  video_io.write_gif(str(good / "clip.gif"), frames)
  where = {"EMPTY": str(tmp_path / "empty"), "BAD": str(bad)}
  config = _config(generated=str(good), reference="shapes")
  for key, value in overrides.items():
    _config_set(config, key, where.get(value, value))
  with pytest.raises(schema.ConfigError, match=message):
    eval_generated.run(config, str(tmp_path / "out"))
  assert not os.path.exists(tmp_path / "out" / "report.json")


def _config_set(config, key, value):
  node = config
  *parents, leaf = key.split(".")
  for part in parents:
    node = node[part]
  node[leaf] = value


def test_missing_folders_and_files_in_a_bucket_are_named(tmp_path, bucket, monkeypatch):
  def no_network(*args, **kwargs):
    raise AssertionError("a network was loaded or compiled")
  monkeypatch.setattr(eval_generated, "I3DLogits", no_network)
  good = upload_folder(MEDIA / "videos", f"{bucket}/good")
  cases = [
      ("generated", f"{bucket}/nothing", "no such folder"),
      ("reference", f"{bucket}/no/ref", "no such folder"),
      ("captions", f"{bucket}/captions.json", "no such file"),
  ]
  for key, value, what in cases:
    config = _config(generated=good, reference="shapes")
    _config_set(config, key, value)
    with pytest.raises(schema.ConfigError, match=f"config.{key}='{value}': {what}"):
      eval_generated.run(config, f"{bucket}/out")
  missing = f"{bucket}/a.json"
  with pytest.raises(schema.ConfigError, match=f"config.reports: '{missing}': no such file"):
    eval_compare.run(_config("compare", reports=f"{missing},{missing}"), str(tmp_path))
  assert storage.listdir(bucket) == ["good"]  # no report was written


def test_compare_needs_two_readable_eval_reports(tmp_path):
  with pytest.raises(schema.ConfigError, match="config.reports=.*at least two"):
    eval_compare.run(_config("compare", reports=str(tmp_path / "a.json")), str(tmp_path))
  (tmp_path / "t.json").write_text(json.dumps({"job": "eval_tokenizer"}))
  with pytest.raises(schema.ConfigError, match="not an eval_generated report"):
    eval_compare.run(_config("compare", reports=f"{tmp_path / 't.json'},{tmp_path / 't.json'}"),
                       str(tmp_path))
