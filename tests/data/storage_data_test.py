"""The data path through a real GCS-protocol server (tests/gcs_emulator.py).

Manifest and media in a bucket -> prepare on two "machines" (two processes,
worker 0 and 1 of 2) into one gs:// folder -> the merged summary -> pretokenize
reads those shards from gs:// and writes token shards there -> the generator
trains a step on them, its grain worker process reading the bucket. The local
paths of each step stay covered by the other tests in tests/data/.
"""
import collections
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from phenaki_jax import storage
from phenaki_jax.data import pretokenize, sources, token_shards, video_io
from phenaki_jax.data.shard_records import UnreadableShardsError
from phenaki_jax.train import train_maskgit
from tests.helpers import REPO, load_config

MEDIA = os.path.join(os.path.dirname(__file__), "media")
NUM_FRAMES, RESOLUTION = 5, 16  # configs/cvivit.py:tiny, the `trained` tokenizer
VIDEOS = {"arm_wrestling_2s.mp4": 3, "film_countdown_2s.mp4": 4}  # clips of 5 frames at 8 fps
IMAGES = ("chelsea.png", "camera.png")
BROKEN = {"corrupted.mp4": video_io.CORRUPTED, "truncated.mp4": video_io.TRUNCATED,
          "not_a_video.mp4": video_io.NOT_A_VIDEO, "noise.mp4": video_io.NOT_A_VIDEO,
          "gone.mp4": video_io.MISSING}


def _upload_media(bucket):
  """The manifest lists bucket-relative names, one gs:// object, and one object that is not there."""
  rows = []
  for sub, name in [("videos", "arm_wrestling_2s.mp4"), ("images", "chelsea.png"),
                    ("bad", "corrupted.mp4"), ("videos", "film_countdown_2s.mp4"),
                    ("bad", "truncated.mp4"), ("images", "camera.png"),
                    ("bad", "not_a_video.mp4")]:
    storage.upload(os.path.join(MEDIA, sub, name), f"{bucket}/media/{sub}/{name}")
    rows.append({"path": f"{sub}/{name}", "caption": f"caption of {name}"})
  rows[3]["path"] = f"{bucket}/media/videos/film_countdown_2s.mp4"
  # Bytes FFmpeg refuses: its message names the file it opened (the download).
  storage.write_bytes(f"{bucket}/media/bad/noise.mp4",
                      np.random.default_rng(0).integers(0, 256, 4096, np.uint8).tobytes())
  rows.append({"path": "bad/noise.mp4", "caption": "not a video"})
  rows.append({"path": "videos/gone.mp4", "caption": "an object that is not there"})
  storage.write_text(f"{bucket}/media/captions.jsonl",
                     "".join(json.dumps(r) + "\n" for r in rows))
  return f"{bucket}/media/captions.jsonl"


def _prepare_on_two_machines(manifest, out):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
  procs = [subprocess.Popen(
      [sys.executable, "-m", "phenaki_jax.main", "--config=configs/prepare.py",
       f"--workdir={out}", f"--config.manifest={manifest}",
       f"--config.num_frames={NUM_FRAMES}", f"--config.resolution={RESOLUTION}",
       "--config.files_per_unit=2", "--config.clips_per_shard=2", "--config.num_workers=1",
       "--config.progress=False", f"--config.worker_index={i}", "--config.worker_count=2"],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(2)]
  for i, proc in enumerate(procs):
    output, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, f"worker {i}:\n{output[-3000:]}"


def test_prepare_on_two_machines_pretokenize_and_train_from_a_bucket(gcs_emulator, trained,
                                                                      tmp_path):
  bucket = gcs_emulator.create_bucket()
  manifest = _upload_media(bucket)
  out = f"{bucket}/prepared"
  _prepare_on_two_machines(manifest, out)

  # --- One merged summary of both workers' units: 9 entries in 5 units of 2.
  summary = storage.read_json(f"{out}/summary.json")
  assert summary["complete"] and summary["units_total"] == summary["units_done"] == 5
  assert [(w["worker_index"], w["units_owned"], w["complete"]) for w in summary["workers"]] == [
      (0, 3, True), (1, 2, True)]
  for unit in range(5):  # unit U was done by worker U % 2
    assert storage.read_json(f"{out}/units/unit-{unit:05d}.json")["worker"] == unit % 2
  assert summary["files_read"] == 9
  assert summary["video_clips"] == sum(VIDEOS.values()) and summary["image_clips"] == 2
  # Broken and missing objects: skipped, each reason naming the gs:// object
  # (never the temporary download).
  skipped = {storage.basename(s["path"]): s for s in summary["skipped_files"]}
  assert {k: v["reason"] for k, v in skipped.items()} == BROKEN
  for name, skip in skipped.items():
    assert skip["path"].startswith(f"{bucket}/media/") and skip["path"] in skip["message"]
    assert "phenaki_jax_" not in skip["message"], skip["message"]

  # --- Every clip exactly once (none lost, none twice), as decoded from the local files.
  video = sources.ClipShardSource(out, kind="video", with_metadata=True)
  assert video.paths == [f"{out}/{s['file']}" for s in summary["shards"]["video"]]
  got = collections.defaultdict(dict)
  for i in range(len(video)):
    ex = video[i]
    key = round(float(ex["start_time"]), 4)
    assert key not in got[storage.basename(ex["source"])], "a clip written twice"
    got[storage.basename(ex["source"])][key] = ex["frames"]
  assert {k: len(v) for k, v in got.items()} == VIDEOS
  for name in VIDEOS:
    for clip in video_io.read_clips(os.path.join(MEDIA, "videos", name), num_frames=NUM_FRAMES,
                                    fps=8, resolution=RESOLUTION):
      np.testing.assert_array_equal(got[name][round(clip.start_time, 4)], clip.frames)
  images = sources.ClipShardSource(out, kind="image", with_metadata=True)
  assert sorted(storage.basename(images[i]["source"]) for i in range(2)) == sorted(IMAGES)

  # --- Pre-tokenise the bucket's shards into the bucket.
  tokens = f"{bucket}/tokens"
  config = load_config("pretokenize", "tiny")
  config.tokenizer.workdir = trained[0]
  config.input.data = "shards"
  config.input.video_shards = config.input.image_shards = out
  config.num_video_examples = config.num_image_examples = -1
  meta = pretokenize.run(config, tokens)
  assert {k: v["records"] for k, v in meta["splits"].items()} == {"video": 7, "image": 2}
  assert token_shards.read_metadata(tokens)["complete"]
  assert len(token_shards.TokenShardSource(tokens, "video", 40)) == 7

  # --- The generator trains on them; a grain worker process reads the bucket.
  config = load_config("maskgit", "tiny")
  config.tokenizer.workdir = trained[0]
  config.input.data, config.input.token_shards = "tokens", tokens
  config.input.num_workers = 1
  config.total_steps, config.eval_every_steps = 1, 0
  result = train_maskgit.train_and_evaluate(config, str(tmp_path / "generator"))
  assert result["step"] == 1 and np.isfinite(result["train"]["train/loss"])

  # --- A shard object that vanishes while a reader has it open stops the
  # read, naming the object (rather than substituting its records).
  last = video.paths[-1]
  storage.remove(last)
  with pytest.raises(UnreadableShardsError, match=f"shard {last} is gone"):
    video[len(video) - 1]
