"""Faults cost no work: non-finite steps are skipped, SIGTERM saves and exits cleanly."""
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from phenaki_jax import metrics
from phenaki_jax.train import cvivit_objective, maskgit_objective, train_cvivit
from phenaki_jax.train import loop as train_loop
from tests.helpers import REPO, load_config


def _tiny(**top):
  config = load_config("cvivit", "tiny,l2vq")
  config.eval_every_steps = 0
  for k, v in top.items():
    config[k] = v
  return config


def test_nonfinite_steps_are_skipped_and_training_goes_on(tmp_path, monkeypatch):
  real_l2 = cvivit_objective.l2_loss
  # Poison every image batch (1-frame clips): one step in five.
  monkeypatch.setattr(cvivit_objective, "l2_loss",
                      lambda t, p: real_l2(t, p) * (jnp.nan if t.shape[1] == 1 else 1.0))
  out = train_cvivit.train_and_evaluate(_tiny(total_steps=10, checkpoint_every_steps=5),
                                        str(tmp_path))
  rows = metrics.read_jsonl(os.path.join(tmp_path, "metrics.jsonl"))
  skipped = [r["step"] for r in rows if r["train/nonfinite_step_fraction"] == 1.0]
  image_steps = [r["step"] for r in rows if "train/image/l2" in r]
  assert skipped == image_steps and len(skipped) == 2, (skipped, image_steps)
  params = jax.device_get(out["state"].params)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))
  assert int(out["state"].nonfinite_streak) == (1 if 10 in skipped else 0)
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["10", "5"]


def test_too_many_nonfinite_steps_stop_with_a_clear_error(tmp_path, monkeypatch):
  monkeypatch.setattr(cvivit_objective, "l2_loss", lambda t, p: jnp.mean(p) * jnp.nan)
  config = _tiny(total_steps=20, checkpoint_every_steps=3, max_consecutive_nonfinite=3)
  with pytest.raises(train_loop.NonFiniteTrainingError, match="3 consecutive steps"):
    train_cvivit.train_and_evaluate(config, str(tmp_path))
  # Nothing was checkpointed: the streak is checked before every save.
  assert not os.listdir(tmp_path / "checkpoints")


# SIGTERM on the tokenizer: integration/storage_training_test.py, with its workdir in a
# bucket (the checkpoint committed there, the resume bitwise).


# --- SIGKILL during an asynchronous save; batch hashes.

_KILL_RUNNER = """
import os, signal, sys
sys.argv = [sys.argv[0]] + sys.argv[2:]
KILL_AT = int(os.environ["KILL_AFTER_SAVE_AT_STEP"])
from phenaki_jax import checkpointing
real_save = checkpointing.Checkpointer.save
def save(self, step, *args, **kwargs):
  out = real_save(self, step, *args, **kwargs)
  if step == KILL_AT:  # the asynchronous save is still being written
    os.kill(os.getpid(), signal.SIGKILL)
  return out
checkpointing.Checkpointer.save = save
from absl import app
from phenaki_jax import main
app.run(main.main, flags_parser=main.parse_flags)
"""


def _last_per_step(workdir):
  out = {}
  for r in metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl")):
    if "train/loss" in r:
      out[r["step"]] = r["train/loss"]
  return out


def _kill_during_save_and_resume(tmp_path, args, whole=None):
  """Runs `args` whole (unless `whole` is such a run's workdir), then killed right after
  step 6's async save and resumed; returns (uninterrupted workdir, killed-and-resumed
  workdir, the resume's stderr)."""
  if whole is None:
    whole = tmp_path / "whole"
    done = subprocess.run([sys.executable, "-m", "phenaki_jax.main", f"--workdir={whole}",
                           *args], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
  killed = tmp_path / "killed"
  runner = tmp_path / "runner.py"
  runner.write_text(_KILL_RUNNER)
  proc = subprocess.run([sys.executable, str(runner), "--", f"--workdir={killed}", *args],
                        cwd=REPO, capture_output=True, text=True, timeout=300,
                        env={**os.environ, "KILL_AFTER_SAVE_AT_STEP": "6"})
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
  again = subprocess.run([sys.executable, "-m", "phenaki_jax.main", f"--workdir={killed}",
                          *args], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert again.returncode == 0, again.stderr[-3000:]
  return whole, killed, again.stderr


def test_sigkill_during_an_async_save_resumes_bitwise_with_the_same_batches(
    tmp_path, uninterrupted_tokenizer):
  from phenaki_jax import batch_log
  whole, killed, log = _kill_during_save_and_resume(tmp_path, uninterrupted_tokenizer.args,
                                                    whole=uninterrupted_tokenizer.workdir)
  # From step 3 if the kill beat the save's commit, from 6 if it did not.
  assert "resumed from step 3" in log or "resumed from step 6" in log
  assert _last_per_step(killed) == _last_per_step(whole)  # bitwise, every step
  # Each step's batch is the uninterrupted run's: none lost, none repeated.
  assert batch_log.read(str(killed)) == batch_log.read(str(whole))
  assert sorted(batch_log.read(str(whole))) == list(range(1, 11))


def test_batch_hashes_tell_batches_apart_and_repeat_for_equal_data():
  from phenaki_jax import batch_log
  a = {"frames": np.zeros((2, 3, 4, 4, 3), np.uint8), "caption": np.asarray(["x", "y"])}
  b = {"frames": a["frames"].copy(), "caption": np.asarray(["x", "z"])}
  assert batch_log.batch_hash(a) == batch_log.batch_hash(dict(a))
  assert batch_log.batch_hash(a) != batch_log.batch_hash(b)
  c = dict(a, frames=a["frames"].copy())
  c["frames"][1, 2, 3, 3, 2] = 1
  assert batch_log.batch_hash(a) != batch_log.batch_hash(c)


# --- Mismatched and unusable checkpoints.

def test_a_model_that_does_not_fit_the_checkpoint_names_the_array_and_the_changed_keys(tmp_path):
  from phenaki_jax import checkpointing
  train_cvivit.train_and_evaluate(_tiny(total_steps=1, checkpoint_every_steps=1), str(tmp_path))
  config = _tiny(total_steps=2, checkpoint_every_steps=1)
  config.model.codebook_size = 32
  with pytest.raises(checkpointing.CheckpointMismatchError) as e:
    train_cvivit.train_and_evaluate(config, str(tmp_path))
  text = str(e.value)
  assert "checkpoint step 1" in text
  assert "params/quantizer/codebook is (64, 8) in the checkpoint but (32, 8)" in text, text
  assert "model.codebook_size: 64 -> 32" in text


def test_unusable_checkpoints_refuse_to_start_unless_allowed_and_are_kept(tmp_path):
  import shutil
  from phenaki_jax import checkpointing
  train_cvivit.train_and_evaluate(_tiny(total_steps=2, checkpoint_every_steps=1), str(tmp_path))
  for step in ("1", "2"):  # damage every step: their arrays are gone
    shutil.rmtree(tmp_path / "checkpoints" / step / "state" / "d", ignore_errors=True)
    for f in (tmp_path / "checkpoints" / step / "state").iterdir():
      if f.is_dir():
        shutil.rmtree(f)
  with pytest.raises(checkpointing.NoUsableCheckpointError,
                     match="fresh_start_if_checkpoints_unusable"):
    train_cvivit.train_and_evaluate(_tiny(total_steps=3, checkpoint_every_steps=1),
                                    str(tmp_path))
  out = train_cvivit.train_and_evaluate(
      _tiny(total_steps=3, checkpoint_every_steps=1, fresh_start_if_checkpoints_unusable=True),
      str(tmp_path))
  assert out["step"] == 3
  assert sorted(os.listdir(tmp_path / "checkpoints.unusable-0")) == ["1", "2"]


# --- The generator trainer under the same faults.

def _tiny_tokenizer(workdir):
  config = _tiny(total_steps=1, checkpoint_every_steps=1)
  train_cvivit.train_and_evaluate(config, str(workdir))
  return str(workdir)


@pytest.mark.slow  # 51 s; storage_training_test stops the tokenizer the same way (TrainLoop) in CI
def test_generator_sigterm_saves_exits_zero_and_resumes_without_losing_steps(tmp_path):
  tok = _tiny_tokenizer(tmp_path / "tok")
  gen = tmp_path / "gen"
  cmd = [sys.executable, "-m", "phenaki_jax.main", "--config=configs/maskgit.py:tiny",
         f"--workdir={gen}", f"--config.tokenizer.workdir={tok}", "--config.total_steps=300",
         "--config.eval_every_steps=0", "--config.checkpoint_every_steps=1000"]
  proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
  jsonl = gen / "metrics.jsonl"
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    if jsonl.exists() and len(jsonl.read_text().splitlines()) >= 3:
      break
    time.sleep(0.2)
  assert proc.poll() is None, proc.stdout.read()[-3000:]
  proc.send_signal(signal.SIGTERM)
  try:
    log, _ = proc.communicate(timeout=120)
  except subprocess.TimeoutExpired:
    proc.kill()
    raise
  assert proc.returncode == 0 and "preempted (SIGTERM)" in log, log[-3000:]
  saved = [int(s) for s in os.listdir(gen / "checkpoints") if s.isdigit()]
  assert len(saved) == 1 and saved[0] < 300
  again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert again.returncode == 0, again.stderr[-3000:]
  assert f"resumed from step {saved[0]}" in again.stderr
  from phenaki_jax import batch_log
  assert sorted(batch_log.read(str(gen))) == list(range(1, 301))


# 40 s. In CI: train_maskgit_test's sharded non-finite skip, and the tokenizer's
# streak stop above (the same TrainLoop).
@pytest.mark.slow
def test_generator_skips_nonfinite_steps_and_stops_after_a_streak(tmp_path, monkeypatch):
  from phenaki_jax.train import train_maskgit
  tok = _tiny_tokenizer(tmp_path / "tok")
  real = maskgit_objective.compute_losses

  def poisoned(*args, always=False, **kwargs):
    loss, parts = real(*args, **kwargs)
    codes = args[5]
    if always or codes.shape[1] == 1:  # image batches: one token frame
      loss = loss * jnp.nan
      parts = {**parts, "train/loss": parts["train/loss"] * jnp.nan}
    return loss, parts

  monkeypatch.setattr(maskgit_objective, "compute_losses", poisoned)
  config = load_config("maskgit", "tiny")
  config.tokenizer.workdir = tok
  config.total_steps, config.eval_every_steps, config.checkpoint_every_steps = 10, 0, 5
  out = train_maskgit.train_and_evaluate(config, str(tmp_path / "gen"))
  rows = metrics.read_jsonl(str(tmp_path / "gen" / "metrics.jsonl"))
  skipped = [r["step"] for r in rows if r["train/nonfinite_step_fraction"] == 1.0]
  image_steps = [r["step"] for r in rows if "train/image/loss" in r]
  assert skipped == image_steps and skipped, (skipped, image_steps)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(out["state"].params)))

  monkeypatch.setattr(maskgit_objective, "compute_losses",
                      lambda *a, **k: poisoned(*a, always=True, **k))
  config.max_consecutive_nonfinite = 3
  with pytest.raises(train_loop.NonFiniteTrainingError, match="3 consecutive steps"):
    train_maskgit.train_and_evaluate(config, str(tmp_path / "gen2"))
  assert not os.listdir(tmp_path / "gen2" / "checkpoints")


# Slow (~35 s): the same TrainLoop and Checkpointer as the tokenizer's SIGKILL test above.
@pytest.mark.slow
def test_generator_sigkill_during_an_async_save_resumes_bitwise(tmp_path):
  from phenaki_jax import batch_log
  tok = _tiny_tokenizer(tmp_path / "tok")
  whole, killed, log = _kill_during_save_and_resume(tmp_path, [
      "--config=configs/maskgit.py:tiny", f"--config.tokenizer.workdir={tok}",
      "--config.total_steps=8", "--config.eval_every_steps=0",
      "--config.checkpoint_every_steps=3"])
  assert "resumed from step 3" in log or "resumed from step 6" in log
  assert _last_per_step(killed) == _last_per_step(whole)
  assert batch_log.read(str(killed)) == batch_log.read(str(whole))


def test_generator_checkpoint_mismatch_and_damage(tmp_path):
  import shutil
  from phenaki_jax import checkpointing
  from phenaki_jax.train import train_maskgit
  tok = _tiny_tokenizer(tmp_path / "tok")
  config = load_config("maskgit", "tiny")
  config.tokenizer.workdir = tok
  config.total_steps, config.eval_every_steps, config.checkpoint_every_steps = 2, 0, 1
  gen = str(tmp_path / "gen")
  train_maskgit.train_and_evaluate(config, gen)
  wider = load_config("maskgit", "tiny")
  wider.tokenizer.workdir = tok
  wider.total_steps, wider.eval_every_steps = 3, 0
  wider.model.mlp_dim = 128
  with pytest.raises(checkpointing.CheckpointMismatchError,
                     match=r"params/generator/transformer/block_0/mlp/\S+ is \(64,\) in the "
                           r"checkpoint but \(128,\).*model.mlp_dim: 64 -> 128"):
    train_maskgit.train_and_evaluate(wider, gen)
  # Step 2 damaged: falls back to step 1, names step 2, and goes on.
  for f in (tmp_path / "gen" / "checkpoints" / "2" / "state").iterdir():
    if f.is_dir():
      shutil.rmtree(f)
  config.total_steps = 3
  out = train_maskgit.train_and_evaluate(config, gen)
  assert out["step"] == 3
