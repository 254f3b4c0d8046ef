"""The standalone tokenizer evaluation on a checkpoint of configs/cvivit.py:tiny."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from phenaki_jax import storage
from phenaki_jax.config import schema
from phenaki_jax.eval import eval_tokenizer as run
from phenaki_jax.train import train_cvivit
from tests.helpers import REPO, load_config, upload_folder

METRICS = {"psnr", "ssim", "lpips", "codebook_usage", "codebook_perplexity", "tokens_per_clip"}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("tokenizer"))
  # Checkpoints are all these tests need: the L2 + VQ objective (no GAN or
  # perceptual networks to compile), two video steps, no trainer eval.
  config = load_config("cvivit", "tiny,l2vq")
  config.total_steps, config.checkpoint_every_steps, config.eval_every_steps = 2, 1, 0
  train_cvivit.train_and_evaluate(config, workdir)
  return workdir


def _eval_config(tokenizer_dir, **overrides):
  config = load_config("eval", "tokenizer_tiny")
  config.tokenizer.workdir = tokenizer_dir
  for key, value in overrides.items():
    section, leaf = key.split(".")
    config[section][leaf] = value
  return config


def test_report_with_fvd_on_9_frame_clips_from_and_into_a_bucket(tokenizer_dir, bucket):
  # The tiny tokenizer trained on 5 frames; being causal it encodes 9, the
  # fewest I3D takes, so the whole FVD path runs (2 clips, I3D at 224). The
  # tokenizer is read from a copy in a bucket, the report goes there (local
  # ones: the command-line test below).
  in_bucket = upload_folder(tokenizer_dir, f"{bucket}/tokenizer")
  config = _eval_config(in_bucket, **{"input.num_frames": 9, "protocol.fvd": True})
  workdir = f"{bucket}/eval"
  out = run.run(config, workdir)
  report = storage.read_json(f"{workdir}/tokenizer_eval_step_2.json")
  assert out["json_path"] == f"{workdir}/tokenizer_eval_step_2.json"
  assert storage.listdir(workdir) == ["tokenizer_eval_step_2.json", "tokenizer_eval_step_2.png"]
  assert set(report) >= {"job", "date", "tokenizer", "metrics", "protocol", "seconds", "config"}
  assert set(report["metrics"]) == METRICS | {"rfvd"}
  assert all(np.isfinite(v) for v in report["metrics"].values())
  assert report["metrics"]["rfvd"] >= 0
  assert report["metrics"]["tokens_per_clip"] == 5 * 4 * 4  # 1 + (9 - 1) / 2 token frames
  assert report["tokenizer"]["step"] == 2 and report["tokenizer"]["weights"] == "ema"
  assert report["tokenizer"]["workdir"] == in_bucket
  assert report["tokenizer"]["token_grid"] == [5, 4, 4]
  p = report["protocol"]
  assert (p["num_clips"], p["fvd"], p["fvd_resolution"], p["fvd_num_frames"]) == (2, True, 224, 9)
  assert (p["lpips_net"], p["lpips_frames_per_clip"]) == ("vgg16", 9)
  assert p["source"]["data"] == "shapes" and p["source"]["seed"] == 0
  assert p["source"]["num_frames"] == 9 and p["source"]["resolution"] == 16
  with storage.open_file(f"{workdir}/tokenizer_eval_step_2.png") as f:
    png = np.asarray(Image.open(f))
  # 2 clips × (input, reconstruction) rows of 9 frames, 16 px upscaled 8×, 2 px gaps.
  assert png.shape == (8 * (4 * 18 - 2), 8 * (9 * 18 - 2), 3)


def test_command_line_on_an_older_step(tokenizer_dir, tmp_path):
  """The command README gives, on step 1's raw weights; 5-frame clips, so no FVD."""
  proc = subprocess.run(
      [sys.executable, "-m", "phenaki_jax.main", "--config=configs/eval.py:tokenizer_tiny",
       f"--workdir={tmp_path}", f"--config.tokenizer.workdir={tokenizer_dir}",
       "--config.tokenizer.step=1", "--config.tokenizer.use_ema=False"],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "tokenizer_eval_step_1.json" in proc.stderr and "psnr=" in proc.stderr
  with open(tmp_path / "tokenizer_eval_step_1.json") as f:
    report = json.load(f)
  assert set(report["metrics"]) == METRICS
  assert report["protocol"]["fvd"] is False
  assert "protocol.fvd=False" in report["protocol"]["fvd_note"]
  assert report["tokenizer"]["step"] == 1 and report["tokenizer"]["weights"] == "raw"
  assert os.path.exists(tmp_path / "tokenizer_eval_step_1.png")


@pytest.fixture(scope="module")
def held_out_shards(tmp_path_factory):
  """Real clips (tests/data/media) prepared the way the tiny tokenizer takes them."""
  from phenaki_jax.data import prepare
  out = str(tmp_path_factory.mktemp("held_out"))
  config = prepare.default_config()
  config.update(dict(manifest=os.path.join(REPO, "tests", "data", "media", "manifest.jsonl"),
                     resolution=16, num_frames=5, num_workers=1, progress=False))
  prepare.run(config, out)
  return out


def test_report_on_prepared_real_shards(tokenizer_dir, held_out_shards, tmp_path):
  config = _eval_config(tokenizer_dir, **{"input.data": "shards",
                                          "input.video_shards": held_out_shards,
                                          "protocol.num_clips": 4})
  report = run.run(config, str(tmp_path))
  source = report["protocol"]["source"]
  assert (source["data"], source["video_shards"]) == ("shards", held_out_shards)
  assert source["held_out"] is True
  assert source["clips"].startswith("held out: other shards"), source["clips"]
  assert report["protocol"]["num_clips"] == 4
  assert all(np.isfinite(v) for v in report["metrics"].values())
  config.protocol.num_clips = 1000
  with pytest.raises(ValueError, match=r"config.protocol.num_clips=1000: the evaluation clips "
                                       r"\(held out: other shards .*\) number only \d+"):
    run.run(config, str(tmp_path))


@pytest.mark.parametrize("overrides,message", [
    ({"tokenizer.workdir": ""}, "config.tokenizer.workdir='': is required"),
    ({"tokenizer.workdir": "/nonexistent/tok"}, "no C-ViViT checkpoint in /nonexistent/tok"),
    ({"tokenizer.step": 5}, r"config.tokenizer.step=5: .* has checkpoint steps \[1, 2\]"),
    ({"protocol.fvd": True}, r"config.protocol.fvd_num_frames=-1, config.input.num_frames=5\)"
                             ": I3D needs at least 9 frames"),
    ({"protocol.fvd": True, "protocol.fvd_num_frames": 7}, "config.protocol.fvd_num_frames=7"),
    ({"input.resolution": 32}, "config.input.resolution=32: the tokenizer was trained at 16x16"),
    ({"input.num_frames": 6}, r"config.input.num_frames=6: the tokenizer takes 1 \+ k·2"),
    ({"input.data": "shards"}, "config.input.video_shards is required"),
    ({"protocol.lpips_net": "squeeze"}, "config.protocol.lpips_net='squeeze'"),
])
def test_errors_name_the_config_key(tokenizer_dir, tmp_path, overrides, message):
  config = _eval_config(tokenizer_dir)
  for key, value in overrides.items():
    section, leaf = key.split(".")
    config[section][leaf] = value
  with pytest.raises(ValueError, match=message):
    run.run(config, str(tmp_path))
  assert not os.listdir(tmp_path)


def test_unknown_key_is_named(tokenizer_dir):
  config = _eval_config(tokenizer_dir)
  with config.unlocked():
    config.protocol.fvd_frames = 9
  with pytest.raises(schema.ConfigError, match="config.protocol.fvd_frames"):
    run.run(config, "/nonexistent/never/created")
