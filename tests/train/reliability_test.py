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

from phenaki_jax import losses, metrics
from phenaki_jax.train import train_cvivit
from tests.helpers import REPO, load_config


def _tiny(**top):
  config = load_config("cvivit", "tiny,l2vq")
  config.eval_every_steps = 0
  for k, v in top.items():
    config[k] = v
  return config


def test_nonfinite_steps_are_skipped_and_training_goes_on(tmp_path, monkeypatch):
  real_l2 = losses.l2_loss
  # Poison every image batch (1-frame clips): one step in five.
  monkeypatch.setattr(losses, "l2_loss",
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
  monkeypatch.setattr(losses, "l2_loss", lambda t, p: jnp.mean(p) * jnp.nan)
  config = _tiny(total_steps=20, checkpoint_every_steps=3, max_consecutive_nonfinite=3)
  with pytest.raises(train_cvivit.NonFiniteTrainingError, match="3 consecutive steps"):
    train_cvivit.train_and_evaluate(config, str(tmp_path))
  # Nothing was checkpointed: the streak is checked before every save.
  assert not os.listdir(tmp_path / "checkpoints")


def test_sigterm_saves_at_the_current_step_exits_zero_and_resumes(tmp_path):
  cmd = [sys.executable, "-m", "phenaki_jax.main", "--config=configs/cvivit.py:tiny,l2vq",
         f"--workdir={tmp_path}", "--config.total_steps=400", "--config.eval_every_steps=0",
         "--config.checkpoint_every_steps=1000"]
  proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
  jsonl = tmp_path / "metrics.jsonl"
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
  assert proc.returncode == 0, log[-3000:]
  assert "preempted (SIGTERM)" in log
  saved = [int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit()]
  last_logged = max(r["step"] for r in metrics.read_jsonl(str(jsonl)))
  assert saved == [last_logged] and 3 <= last_logged < 400
  again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert again.returncode == 0, again.stderr[-3000:]
  assert f"resumed from step {last_logged}" in again.stderr
  steps = [r["step"] for r in metrics.read_jsonl(str(jsonl))]
  assert steps == list(range(1, 401))  # no step lost or repeated
