"""Tests for phenaki_jax.data.prepare and the shard sources it feeds."""

import fcntl
import glob
import hashlib
import importlib.util
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time

import grain
import numpy as np
import pytest

from phenaki_jax.data import prepare, shard_writer
from phenaki_jax.data import sources
from phenaki_jax.data import video_io

MEDIA = os.path.join(os.path.dirname(__file__), "media")
MIXED = os.path.join(MEDIA, "mixed.jsonl")
GOOD = os.path.join(MEDIA, "manifest.jsonl")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))

# Clips of 4 frames at 8 fps, back to back: 16, 53 and 21 resampled frames.
EXPECTED_VIDEO_CLIPS = {"arm_wrestling_2s.mp4": 4, "eye_makeup.avi": 13,
                        "film_countdown_2s.mp4": 5}
EXPECTED_IMAGES = ("chelsea.png", "camera.png", "rocket.jpg")
EXPECTED_SKIPS = {
    "corrupted.mp4": video_io.CORRUPTED,
    "truncated.mp4": video_io.TRUNCATED,
    "empty.mp4": video_io.EMPTY,
    "not_a_video.mp4": video_io.NOT_A_VIDEO,
    "rotated_90.mov": video_io.TOO_SHORT,  # 0.1 s: one frame at 8 fps
    "unordered_timestamps.mov": video_io.TOO_SHORT,
    "missing_file.mp4": video_io.MISSING,
}


def _config(manifest=MIXED, **overrides):
  config = prepare.default_config()
  config.update(dict(manifest=manifest, resolution=16, num_frames=4,
                     files_per_unit=3, clips_per_shard=5, num_workers=1,
                     progress=False))
  config.update(overrides)
  return config


def _records(out_dir):
  """Every record as a comparable tuple, in shard order."""
  rows = []
  for kind, paths in sources.find_prepared_shards(out_dir).items():
    if not paths:
      continue
    source = sources.ClipShardSource(paths, with_metadata=True)
    for i in range(len(source)):
      ex = source[i]
      rows.append((kind, os.path.basename(ex["source"]),
                   round(float(ex["start_time"]), 4), ex["caption"],
                   ex["frames"].shape,
                   hashlib.sha1(ex["frames"].tobytes()).hexdigest()))
  return rows


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("clean"))
  summary = prepare.run(_config(), out)
  return out, summary, _records(out)


def test_bad_files_skipped_with_reasons_good_files_kept(clean_run):
  out, summary, records = clean_run
  assert summary["complete"]
  skipped = {os.path.basename(s["path"]): s for s in summary["skipped_files"]}
  assert {k: v["reason"] for k, v in skipped.items()} == EXPECTED_SKIPS
  for name, skip in skipped.items():
    assert name in skip["message"]  # the reason names the file
    assert skip["line"] >= 1
  per_source = {}
  for kind, name, *_ in records:
    per_source[(kind, name)] = per_source.get((kind, name), 0) + 1
  expected = {("video", k): v for k, v in EXPECTED_VIDEO_CLIPS.items()}
  expected.update({("image", k): 1 for k in EXPECTED_IMAGES})
  assert per_source == expected
  assert len(set(records)) == len(records)  # no duplicates


def test_summary_and_metadata_files(clean_run):
  out, summary, records = clean_run
  with open(os.path.join(out, "summary.json")) as f:
    assert json.load(f) == summary
  assert summary["files_read"] == 13
  assert summary["files_ok"] == 6
  assert summary["video_files"] == 3 and summary["image_files"] == 3
  assert summary["video_clips"] == sum(EXPECTED_VIDEO_CLIPS.values())
  assert summary["image_clips"] == 3
  assert summary["clips_written"] == len(records) == 25
  assert summary["files_skipped"] == 7
  assert summary["skipped_by_reason"] == {
      "corrupted": 1, "truncated": 1, "empty": 1, "not_a_video": 1,
      "too_short": 2, "missing": 1}
  for kind in ("video", "image"):
    listed = summary["shards"][kind]
    assert all(s["records"] <= 5 for s in listed)  # clips_per_shard
    assert sorted(os.path.join(out, s["file"]) for s in listed) == (
        sources.find_prepared_shards(out)[kind])
  assert sum(s["records"] for s in summary["shards"]["video"]) == 22
  with open(os.path.join(out, "metadata.json")) as f:
    meta = json.load(f)
  assert (meta["resolution"], meta["num_frames"], meta["fps"]) == (16, 4, 8.0)
  assert meta["record_version"] == sources.RECORD_VERSION
  assert meta["settings"]["clip_stride_frames"] == 4
  assert not glob.glob(os.path.join(out, "*", "*.tmp"))


def test_clip_shard_source_contract(clean_run):
  out, _, _ = clean_run
  video = sources.ClipShardSource(out, kind="video")
  assert len(video) == 22
  example = video[0]
  assert set(example) == {"frames", "caption"}
  assert example["frames"].dtype == np.uint8
  assert example["frames"].shape == (4, 16, 16, 3)
  assert example["caption"].startswith("Two people arm wrestle")
  image = sources.ClipShardSource(os.path.join(out, "image"))
  assert len(image) == 3 and image[0]["frames"].shape == (1, 16, 16, 3)
  with pytest.raises(ValueError, match="kind"):
    sources.ClipShardSource(out)  # both kinds present: must choose
  # Picklable (grain workers are spawned) and equal after the trip.
  clone = pickle.loads(pickle.dumps(video))
  np.testing.assert_array_equal(clone[5]["frames"], video[5]["frames"])


def test_shards_feed_grain_map_dataset(clean_run):
  out, _, _ = clean_run
  shards = sources.find_prepared_shards(out)
  dataset = (grain.MapDataset.source(sources.ClipShardSource(shards["video"]))
             .shuffle(seed=0).batch(4, drop_remainder=True))
  batches = list(dataset)
  assert len(batches) == 5
  assert batches[0]["frames"].shape == (4, 4, 16, 16, 3)
  assert batches[0]["frames"].dtype == np.uint8
  assert len(batches[0]["caption"]) == 4


def test_video_frames_match_video_io(clean_run):
  out, _, _ = clean_run
  source = sources.ClipShardSource(out, kind="video", with_metadata=True)
  by_start = {round(float(source[i]["start_time"]), 4): source[i]["frames"]
              for i in range(len(source))
              if source[i]["source"].endswith("eye_makeup.avi")}
  clips = video_io.read_clips(os.path.join(MEDIA, "videos", "eye_makeup.avi"),
                              num_frames=4, fps=8, resolution=16)
  assert len(clips) == len(by_start)
  for clip in clips:
    np.testing.assert_array_equal(by_start[round(clip.start_time, 4)],
                                  clip.frames)


def test_rerun_of_finished_job_changes_nothing(clean_run, tmp_path):
  out, summary, records = clean_run
  copy = str(tmp_path / "copy")
  shutil.copytree(out, copy)
  again = prepare.run(_config(), copy)
  assert _records(copy) == records
  assert {k: v for k, v in again.items() if k != "elapsed_s"} == {
      k: v for k, v in summary.items() if k != "elapsed_s"}


def test_resume_after_stopping_midway(clean_run, tmp_path):
  out = str(tmp_path / "out")
  first = prepare.run(_config(max_units=2), out)
  assert not first["complete"] and first["units_done"] == 2
  with open(os.path.join(out, "summary.json")) as f:
    assert not json.load(f)["complete"]
  second = prepare.run(_config(), out)
  assert second["complete"] and second["units_done"] == 5
  assert _records(out) == clean_run[2]


def test_resume_after_losing_files(clean_run, tmp_path):
  out = str(tmp_path / "out")
  shutil.copytree(clean_run[0], out)
  os.remove(os.path.join(out, "summary.json"))
  # Unit 1 "died" after renaming its shards but before its report ...
  os.remove(os.path.join(out, "units", "unit-00001.json"))
  # ... and a finished unit lost a shard.
  os.remove(glob.glob(os.path.join(out, "video", "video-00003-*"))[0])
  summary = prepare.run(_config(), out)
  assert summary["complete"]
  assert _records(out) == clean_run[2]


def test_shard_write_is_atomic(clean_run, tmp_path, monkeypatch):
  out = str(tmp_path / "out")

  class Crash(Exception):
    pass

  original = shard_writer.ShardWriter.write

  def crash_on_second_record(self, record):
    if self._count == 1:
      raise Crash()
    original(self, record)

  monkeypatch.setattr(shard_writer.ShardWriter, "write", crash_on_second_record)
  with pytest.raises(Crash):
    prepare.run(_config(), out)
  # Unit 0 crashed inside its first shard: at most a hidden temporary file
  # (.video-00000-000.array_record.*.tmp), no final name.
  assert [n for n in os.listdir(os.path.join(out, "video"))
          if not n.startswith(".video-00000-000.array_record.")] == []
  assert not os.path.exists(os.path.join(out, "units", "unit-00000.json"))
  assert not os.path.exists(os.path.join(out, "summary.json"))
  # A kill leaves the temporary file for certain: the rerun must remove it.
  open(os.path.join(out, "video", ".video-00000-000.array_record.x.tmp"), "w").close()
  monkeypatch.undo()
  assert prepare.run(_config(), out)["complete"]
  assert not [n for kind in ("video", "image") for n in os.listdir(os.path.join(out, kind))
              if n.endswith(".tmp")]
  assert _records(out) == clean_run[2]


def test_resume_after_kill(clean_run, tmp_path):
  out = str(tmp_path / "out")
  cmd = [sys.executable, "-m", "phenaki_jax.data.prepare",
         f"--manifest={MIXED}", f"--out={out}", "--config.resolution=16",
         "--config.num_frames=4", "--config.files_per_unit=1",
         "--config.clips_per_shard=5", "--config.num_workers=1",
         "--config.progress=False"]
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  deadline = time.time() + 60
  try:
    while not glob.glob(os.path.join(out, "units", "unit-*.json")):
      assert proc.poll() is None, "prepare exited before the kill"
      assert time.time() < deadline
      time.sleep(0.005)
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  assert not os.path.exists(os.path.join(out, "summary.json"))
  done = len(glob.glob(os.path.join(out, "units", "unit-*.json")))
  assert 1 <= done < 13
  # Same settings as the killed run, then compare with the clean run.
  summary = prepare.run(_config(files_per_unit=1), out)
  assert summary["complete"] and summary["units_done"] == 13
  assert sorted(_records(out)) == sorted(clean_run[2])


def test_parallel_workers_match_in_process(clean_run, tmp_path):
  out = str(tmp_path / "out")
  summary = prepare.run(_config(num_workers=2), out)
  assert summary["complete"]
  assert _records(out) == clean_run[2]


def test_two_workers_share_one_folder_and_each_resumes_on_its_own(clean_run, tmp_path):
  out = str(tmp_path / "out")
  # 13 entries in units of 3: worker 0 owns units 0, 2, 4; worker 1 owns 1, 3.
  first = prepare.run(_config(worker_index=0, worker_count=2, max_units=1), out)
  assert not first["complete"]  # stopped early, like a killed worker
  second = prepare.run(_config(worker_index=1, worker_count=2), out)
  assert not second["complete"] and second["units_done"] == 3
  # Until every worker has finished there is no summary, only the workers' reports.
  assert not os.path.exists(os.path.join(out, "summary.json"))
  worker1 = os.path.join(out, "units", "unit-00001.json")
  stamp = os.stat(worker1).st_mtime_ns
  final = prepare.run(_config(worker_index=0, worker_count=2), out)
  with open(os.path.join(out, "workers", "worker-00000-of-00002.json")) as f:
    assert json.load(f)["units_this_run"] == 2  # only its unfinished units 2 and 4
  assert os.stat(worker1).st_mtime_ns == stamp  # the other worker's units untouched
  assert final["complete"] and final["units_done"] == final["units_total"] == 5
  with open(os.path.join(out, "summary.json")) as f:
    assert json.load(f) == final
  assert [(w["worker_index"], w["units_owned"]) for w in final["workers"]] == [(0, 3), (1, 2)]
  assert _records(out) == clean_run[2]  # nothing lost, nothing twice
  keep = ("video_clips", "image_clips", "skipped_files", "shards", "files_read")
  assert {k: final[k] for k in keep} == {k: clean_run[1][k] for k in keep}
  # A merge any worker can run gives the same summary.
  merged = prepare.run(_config(worker_count=2, merge_only=True), out)
  assert {k: v for k, v in merged.items() if k != "elapsed_s"} == {
      k: v for k, v in final.items() if k != "elapsed_s"}


@pytest.mark.parametrize("key,value,count", [("worker_index", 2, 2), ("worker_index", -1, 2),
                                             ("worker_count", -1, 2), ("num_workers", -1, 2),
                                             ("worker_index", 1, 0), ("eval_fraction", 1.0, 1),
                                             ("eval_fraction", -0.1, 1)])
def test_worker_keys_are_checked_before_any_work(tmp_path, key, value, count):
  config = _config(worker_count=count)
  config[key] = value
  with pytest.raises(ValueError, match=f"config.{key}={value}"):
    prepare.run(config, str(tmp_path / "out"))
  assert not os.path.exists(tmp_path / "out")


def test_worker_count_0_makes_each_jax_process_a_worker(clean_run, tmp_path):
  # One JAX process here: worker 0 of 1, the whole manifest (the pod case, N
  # processes, is worker jax.process_index() of jax.process_count()).
  summary = prepare.run(_config(worker_count=0), str(tmp_path / "out"))
  assert summary["complete"] and [w["worker_index"] for w in summary["workers"]] == [0]
  assert _records(str(tmp_path / "out")) == clean_run[2]


def test_units_run_by_another_engine_then_merged(clean_run, tmp_path):
  """What docs/data.md says for Apache Beam: the same units, any runner, then one merge."""
  out = str(tmp_path / "out")
  config = _config()
  settings = prepare.Settings.from_config(config)
  for unit, entries in reversed(list(prepare.work_units(config))):  # any order
    prepare.process_unit(out, unit, entries, settings)
  summary = prepare.run(config, out)  # finds every unit done: checks and merges
  assert summary["complete"]
  with open(os.path.join(out, "workers", "worker-00000-of-00001.json")) as f:
    assert json.load(f)["units_this_run"] == 0
  assert _records(out) == clean_run[2]


def test_changed_settings_refuse_to_mix(clean_run, tmp_path):
  out = str(tmp_path / "out")
  shutil.copytree(clean_run[0], out)
  with pytest.raises(ValueError, match="other settings"):
    prepare.run(_config(resolution=32), out)


def test_second_writer_is_refused(tmp_path):
  out = tmp_path / "out"
  out.mkdir()
  with open(out / ".lock-worker-00000", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    with pytest.raises(RuntimeError, match="another prepare"):
      prepare.run(_config(), str(out))


@pytest.mark.parametrize("codec", ["png", "jpeg"])
def test_compressed_frame_codecs(clean_run, tmp_path, codec):
  manifest = tmp_path / "m.jsonl"
  manifest.write_text(
      json.dumps({"path": os.path.join(MEDIA, "videos", "arm_wrestling_2s.mp4"),
                  "caption": "a"}) + "\n" +
      json.dumps({"path": os.path.join(MEDIA, "images", "chelsea.png"),
                  "caption": "b"}) + "\n")
  out = str(tmp_path / "out")
  prepare.run(_config(manifest=str(manifest), frame_codec=codec), out)
  got = {(r[1], r[2]): r for r in _records(out)}
  reference = sources.ClipShardSource(clean_run[0], kind="video")
  mine = sources.ClipShardSource(out, kind="video")
  assert len(mine) == 4 and got[("chelsea.png", 0.0)][4] == (1, 16, 16, 3)
  diff = np.abs(mine[1]["frames"].astype(int) - reference[1]["frames"]).mean()
  if codec == "png":
    assert diff == 0
  else:
    assert 0 < diff < 6


def _shipped_config(variant):
  spec = importlib.util.spec_from_file_location(
      "prepare_config", os.path.join(REPO, "configs", "prepare.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)


def test_shipped_tiny_variant_runs(tmp_path, monkeypatch):
  monkeypatch.chdir(REPO)  # the variant's manifest path is repo-relative
  config = _shipped_config("tiny")
  config.progress = False
  config.lock()  # as main.py loads it
  summary = prepare.run(config, str(tmp_path / "out"))
  assert summary["complete"] and summary["files_skipped"] == 0
  assert summary["image_clips"] == 3 and summary["video_clips"] > 0
  assert [os.path.basename(f) for f in summary["eval_split"]["files"]] == [
      "arm_wrestling_2s.mp4", "rocket.jpg"]
  assert sources.ClipShardSource(str(tmp_path / "out"),
                                 kind="video")[0]["frames"].shape == (
                                     11, 32, 32, 3)


def test_unknown_config_key_is_an_error(tmp_path):
  config = _config()
  config.resolutoin = 8
  with pytest.raises(ValueError, match="resolutoin"):
    prepare.run(config, str(tmp_path / "out"))


def test_csv_manifest_with_webvid_columns(tmp_path):
  manifest = tmp_path / "results_2M_val.csv"
  manifest.write_text(
      "videoid,name,page_dir,duration\n"
      'arm_wrestling_2s,"Two people, arm wrestling",videos,2\n'
      "eye_makeup,Makeup,videos,6\n"
      "gone,Missing video,videos,3\n")
  config = _shipped_config("webvid")
  config.update(dict(manifest=str(manifest), media_root=MEDIA, resolution=16,
                     num_frames=4, num_workers=1, progress=False))
  summary = prepare.run(config, str(tmp_path / "out"))
  # eye_makeup is an .avi: the template names a file that does not exist.
  assert summary["video_clips"] == 4
  assert summary["skipped_by_reason"] == {"missing": 2}
  names = sorted(os.path.basename(s["path"]) for s in summary["skipped_files"])
  assert names == ["eye_makeup.mp4", "gone.mp4"]
  source = sources.ClipShardSource(str(tmp_path / "out"), kind="video")
  assert source[0]["caption"] == "Two people, arm wrestling"


def test_csv_custom_columns_and_missing_column(tmp_path):
  manifest = tmp_path / "m.csv"
  manifest.write_text("file,text\nimages/chelsea.png,a cat\n")
  config = _config(manifest=str(manifest), path_column="file",
                   caption_column="text", media_root=MEDIA)
  assert prepare.run(config, str(tmp_path / "a"))["image_clips"] == 1
  with pytest.raises(ValueError, match="no column"):
    prepare.run(_config(manifest=str(manifest)), str(tmp_path / "b"))


def test_bad_manifest_lines_are_reported(tmp_path):
  chelsea = os.path.join(MEDIA, "images", "chelsea.png")
  manifest = tmp_path / "m.jsonl"
  manifest.write_text("\n".join([
      json.dumps({"path": chelsea, "caption": "ok"}),
      '{"path": "broken',
      "[1, 2]",
      json.dumps({"caption": "no path"}),
      "",
      json.dumps({"path": chelsea}),
      json.dumps({"path": "https://example.com/v.mp4", "caption": "remote"}),
  ]) + "\n")
  summary = prepare.run(_config(manifest=str(manifest)), str(tmp_path / "o"))
  assert summary["image_clips"] == 1
  assert summary["skipped_by_reason"] == {prepare.BAD_MANIFEST_ENTRY: 5}
  assert [s["line"] for s in summary["skipped_files"]] == [2, 3, 4, 6, 7]
  assert all("line" in s["message"] for s in summary["skipped_files"])


def test_tfds_clip_source(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  pytest.importorskip("tensorflow")  # building (not reading) needs TF

  class TinyClips(tfds.core.GeneratorBasedBuilder):
    # A dotted test-module name sends tfds looking for its code path through
    # importlib_resources, which this stack does not install.
    __module__ = "tiny_clips"
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      features = tfds.features.FeaturesDict({
          "video": tfds.features.Video(shape=(None, 8, 8, 3)),
          "still": tfds.features.Image(shape=(8, 8, 1)),
          "meta": {"text": tfds.features.Text()},
      })
      return tfds.core.DatasetInfo(builder=self, features=features)

    def _split_generators(self, dl_manager):
      del dl_manager
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for i in range(3):
        video = np.zeros((4, 8, 8, 3), np.uint8)
        video[..., 0] = 200
        video[..., 1] = 40 * i
        yield i, {"video": video, "still": np.full((8, 8, 1), 9, np.uint8),
                  "meta": {"text": f"clip {i}"}}

  data_dir = str(tmp_path / "tfds")
  builder = TinyClips(data_dir=data_dir, file_format="array_record")
  builder.download_and_prepare()
  clips = sources.TfdsClipSource("tiny_clips", data_dir=data_dir,
                                 caption_key="meta/text")
  assert len(clips) == 3
  by_caption = {clips[i]["caption"]: clips[i]["frames"] for i in range(3)}
  assert set(by_caption) == {"clip 0", "clip 1", "clip 2"}
  frames = by_caption["clip 2"]
  assert frames.shape == (4, 8, 8, 3) and frames.dtype == np.uint8
  np.testing.assert_array_equal(frames[0, 0, 0], (200, 80, 0))  # RGB order
  stills = sources.TfdsClipSource("tiny_clips", data_dir=data_dir,
                                  frames_key="still", caption_key="meta/text")
  assert stills[0]["frames"].shape == (1, 8, 8, 3)
  # From the files alone (no builder class), as a reader elsewhere would.
  by_dir = sources.TfdsClipSource(
      os.path.join(data_dir, "tiny_clips", "1.0.0"), caption_key="meta/text")
  clone = pickle.loads(pickle.dumps(by_dir))
  np.testing.assert_array_equal(clone[1]["frames"], clips[1]["frames"])
  batch = next(iter(grain.MapDataset.source(clone).batch(3)))
  assert batch["frames"].shape == (3, 4, 8, 8, 3)


# --- The evaluation split.

# eval_key of each good file's manifest path (fixed: sha256): below 0.3 are
# arm_wrestling (0.11), rocket (0.15) and film_countdown (0.25).
EVAL_AT_0_3 = {"arm_wrestling_2s.mp4", "film_countdown_2s.mp4", "rocket.jpg"}


def _records_by_split(out_dir):
  """{split: records} with the source names, as _records has them."""
  out = {}
  for split in ("train", "eval"):
    rows = []
    for kind, paths in sources.find_prepared_shards(out_dir, split).items():
      if paths:
        source = sources.ClipShardSource(paths, with_metadata=True)
        rows += [(kind, os.path.basename(source[i]["source"]), round(float(source[i]["start_time"]), 4),
                  hashlib.sha1(source[i]["frames"].tobytes()).hexdigest())
                 for i in range(len(source))]
    out[split] = rows
  return out


@pytest.fixture(scope="module")
def eval_run(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("eval_split"))
  return out, prepare.run(_config(eval_fraction=0.3), out), _records_by_split(out)


def test_eval_split_is_decided_by_source_file(clean_run, eval_run):
  out, summary, by_split = eval_run
  train = {name for _, name, *_ in by_split["train"]}
  held_out = {name for _, name, *_ in by_split["eval"]}
  assert held_out == EVAL_AT_0_3 and not train & held_out  # no file on both sides
  assert train == {"eye_makeup.avi", "chelsea.png", "camera.png"}
  # Together the two splits are exactly the clips of a run without one.
  everything = sorted(r[:3] + r[5:] for r in clean_run[2])
  assert sorted(r for rows in by_split.values() for r in rows) == everything
  split = summary["eval_split"]
  assert (split["fraction"], split["video_files"], split["image_files"]) == (0.3, 2, 1)
  assert split["video_clips"] == EXPECTED_VIDEO_CLIPS["arm_wrestling_2s.mp4"] + (
      EXPECTED_VIDEO_CLIPS["film_countdown_2s.mp4"])
  assert sorted(os.path.basename(f) for f in split["files"]) == sorted(EVAL_AT_0_3)
  # Top-level counts cover both splits; `shards` are the training ones.
  assert summary["clips_written"] == clean_run[1]["clips_written"]
  assert sum(s["records"] for s in summary["shards"]["video"]) == 13
  assert all(s["file"].startswith("eval/video/") for s in summary["eval_shards"]["video"])
  # The decision is the name's alone: the same with any other fraction's
  # threshold, and about `fraction` of many names.
  names = [f"videos/clip_{i}.mp4" for i in range(20_000)]
  share = sum(prepare.split_of(n, 0.01) == "eval" for n in names) / len(names)
  assert abs(share - 0.01) < 0.002, share
  assert all(prepare.split_of(n, 0.3) == "eval" for n in names if prepare.split_of(n, 0.01) == "eval")
  assert prepare.split_of("videos/arm_wrestling_2s.mp4", 0.0) == "train"


def test_eval_split_same_with_two_workers_and_resume(eval_run, tmp_path):
  out = str(tmp_path / "out")
  prepare.run(_config(eval_fraction=0.3, worker_index=0, worker_count=2, max_units=1), out)
  prepare.run(_config(eval_fraction=0.3, worker_index=1, worker_count=2), out)
  final = prepare.run(_config(eval_fraction=0.3, worker_index=0, worker_count=2), out)
  assert final["complete"]
  assert _records_by_split(out) == eval_run[2]
  assert final["eval_split"] == eval_run[1]["eval_split"]
  # A held-out shard lost after the fact: its unit is redone, by its worker.
  lost = os.path.join(out, final["eval_shards"]["video"][0]["file"])
  os.remove(lost)
  unit = int(os.path.basename(lost).split("-")[1])
  prepare.run(_config(eval_fraction=0.3, worker_index=unit % 2, worker_count=2), out)
  assert os.path.exists(lost) and _records_by_split(out) == eval_run[2]


def test_folder_prepared_before_the_split_resumes_with_fraction_0(clean_run, tmp_path):
  out = str(tmp_path / "out")
  shutil.copytree(clean_run[0], out)
  path = os.path.join(out, "metadata.json")
  with open(path) as f:
    meta = json.load(f)
  del meta["settings"]["eval_fraction"]  # as written before the split existed
  with open(path, "w") as f:
    json.dump(meta, f)
  assert prepare.run(_config(eval_fraction=0.0), out)["complete"]
  with pytest.raises(ValueError, match="eval_fraction"):
    prepare.run(_config(eval_fraction=0.3), out)


def test_split_name_is_the_path_under_media_root(tmp_path):
  # The same file listed relative and absolute: one name, so one side; a
  # moved media folder (another root) keeps the names.
  manifest = tmp_path / "m.jsonl"
  video = os.path.join(MEDIA, "videos", "arm_wrestling_2s.mp4")
  manifest.write_text(json.dumps({"path": "videos/arm_wrestling_2s.mp4", "caption": "a"}) + "\n"
                      + json.dumps({"path": video, "caption": "b"}) + "\n")
  entries = list(prepare.iter_manifest(str(manifest), media_root=MEDIA))
  assert [e.name for e in entries] == ["videos/arm_wrestling_2s.mp4"] * 2
