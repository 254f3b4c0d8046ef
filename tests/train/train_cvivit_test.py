"""Trainer smoke runs: exact resume, outputs, config errors before compiling; dead-code restarts."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from phenaki_jax.config import schema
from phenaki_jax import metrics, sharding
from phenaki_jax.train import train_cvivit
from tests.helpers import REPO, load_config, tokenizer_train_state


def _losses(workdir):
  """Per-step train losses; a repeated step (re-done after a resume) keeps its last value."""
  rows = metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("whole"))
  out = train_cvivit.train_and_evaluate(load_config("cvivit", "tiny"), workdir)
  return workdir, out


def test_run_writes_checkpoints_metrics_images_and_config(uninterrupted):
  workdir, out = uninterrupted
  config = load_config("cvivit", "tiny")
  assert out["step"] == config.total_steps
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3", "6"]
  assert sorted(_losses(workdir)) == list(range(1, config.total_steps + 1))
  assert all(np.isfinite(v) for v in _losses(workdir).values())
  assert os.path.exists(os.path.join(workdir, "reconstructions", "step_0000006.png"))
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir))
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["model"]["codebook_size"] == config.model.codebook_size
  assert "eval/psnr" in out["eval"]


def test_stop_and_resume_gives_identical_losses(uninterrupted, tmp_path):
  whole, _ = uninterrupted
  workdir = str(tmp_path / "resumed")
  # Stop after step 4: the last checkpoint is step 4, so the second run restores
  # params, optimizer state and the data position there.
  first = train_cvivit.train_and_evaluate(load_config("cvivit", "tiny"), workdir, stop_after_step=4)
  assert first["step"] == 4
  second = train_cvivit.train_and_evaluate(load_config("cvivit", "tiny"), workdir)
  assert second["step"] == 6
  want, got = _losses(whole), _losses(workdir)
  assert sorted(got) == sorted(want)
  for step in want:  # bitwise on CPU
    assert got[step] == want[step], (step, got[step], want[step])


def test_unknown_key_is_named():
  config = load_config("cvivit", "tiny")
  with config.unlocked():
    config.input.video_ratoi = 0.5
  with pytest.raises(schema.ConfigError, match="config.input.video_ratoi"):
    train_cvivit.train_and_evaluate(config, "/nonexistent/never/created")


@pytest.mark.parametrize("key,value,message", [
    ("input.num_frames", 6, "config.input.num_frames=6: must be 1 \\+ k"),
    ("input.resolution", 18, "config.input.resolution=18: must be divisible by model.patch_size"),
    ("mesh.shape", (3, 1, 1), "config.mesh.shape"),
    ("input.batch_size", 6, "config.input.batch_size=6"),
    ("input.video_ratio", 1.5, "config.input.video_ratio=1.5"),
    ("model.dtype", "float33", "config.model.dtype='float33'"),
])
def test_impossible_values_fail_naming_the_key(key, value, message, tmp_path):
  config = load_config("cvivit", "tiny")
  section, leaf = key.split(".")
  config[section][leaf] = value
  with pytest.raises(schema.ConfigError, match=message):
    train_cvivit.train_and_evaluate(config, str(tmp_path))
  assert not os.path.exists(tmp_path / "checkpoints")


def test_command_line_unknown_key_is_named(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "phenaki_jax.main", "--config=configs/cvivit.py:tiny,l2vq",
       f"--workdir={tmp_path}", "--config.model.widht=8"],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0
  assert "widht" in proc.stderr and "--config.model.widht=8" in proc.stderr


def test_tokenizer_api_loads_checkpoint_and_round_trips(uninterrupted):
  from phenaki_jax.data import pipeline
  from phenaki_jax.tokenizer import Tokenizer
  workdir, out = uninterrupted
  tok = Tokenizer.load(workdir)
  assert tok.step == 6
  config = tok.config
  frames = pipeline.eval_videos(config.input, seed=config.seed, count=2)
  codes = tok.encode(frames)
  assert codes.shape == (2, 3, 4, 4) and codes.dtype == np.int32
  video = tok.decode(codes)
  assert video.shape == frames.shape
  # The trainer's final EMA weights by default, its raw weights on request.
  final = jax.device_get(out["state"])
  np.testing.assert_allclose(jax.device_get(tok.params["first_frame_embed"]["kernel"]),
                             final.ema_params["first_frame_embed"]["kernel"])
  raw = Tokenizer.load(workdir, use_ema=False)
  np.testing.assert_allclose(jax.device_get(raw.params["first_frame_embed"]["kernel"]),
                             final.params["first_frame_embed"]["kernel"])
  assert not np.allclose(final.params["first_frame_embed"]["kernel"],
                         final.ema_params["first_frame_embed"]["kernel"])
  older = Tokenizer.load(workdir, step=3)
  assert older.step == 3
  assert not np.allclose(older.params["first_frame_embed"]["kernel"],
                         tok.params["first_frame_embed"]["kernel"])


def _codebook_moment(opt_state, name):
  (leaf,) = [leaf for path, leaf in jax.tree_util.tree_flatten_with_path(opt_state)[0]
             if any(getattr(k, "name", None) == name for k in path)
             and getattr(path[-1], "key", None) == "codebook"]
  return np.asarray(leaf)


def test_a_restarted_code_does_not_keep_the_moments_of_the_code_it_replaced():
  config = schema.complete(load_config("cvivit", "tiny,l2vq"))
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  noise = np.random.default_rng(0).integers(0, 256, (3, 8, 5, 16, 16, 3), dtype=np.uint8)
  with sharding.use_mesh(mesh, config.logical_axis_rules):
    model, tx, state = tokenizer_train_state(config, mesh)
    step = jax.jit(train_cvivit.make_train_step(model, tx, config))
    for frames in noise:  # most codes get picked, so get moments of their own
      state, _, _ = step(state, {"frames": frames})
    before = _codebook_moment(state.opt_state, "mu")
    # Every code counts as dead again, and black clips pick few: the others restart.
    state = state.replace(code_usage=state.code_usage * 0)
    new_state, parts, _ = step(state, {"frames": np.zeros_like(noise[0])})
  k = config.model.codebook_size
  restarted = np.isclose(np.asarray(new_state.code_usage), 1.0 / k)
  assert restarted.sum() == int(parts["train/vq/restarted_codes"]) > 0
  moved = restarted & np.abs(before).sum(axis=1).astype(bool)
  assert moved.any()  # some restarted code had moments of its own
  mu, nu = (_codebook_moment(new_state.opt_state, n) for n in ("mu", "nu"))
  assert not mu[restarted].any()
  np.testing.assert_allclose(nu[restarted], np.broadcast_to(nu[~restarted].mean(axis=0),
                                                            nu[restarted].shape), rtol=1e-5)
  assert mu[~restarted].any()
