"""Training with its workdirs in a bucket (a real GCS-protocol server: tests/gcs_emulator.py).

Checkpoints, metrics, TensorBoard events, batch hashes, config.json and the
generator's tokenizer record all go to gs://; a SIGTERM and a bucket that
vanishes mid-run cost no committed step, and a resumed run's per-step losses
are bitwise those of an uninterrupted local run (fixture uninterrupted_tokenizer).
"""
import os
import signal
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest

from phenaki_jax import batch_log, checkpointing, metrics, sharding, storage
from phenaki_jax.generator import Generator, SamplingOptions
from phenaki_jax.train import train_cvivit, train_maskgit
from tests.helpers import REPO, load_config, upload_folder
from tests.integration.fault_runs import tokenizer_config


def _losses(workdir):
  """Per-step train losses; a step redone after a resume keeps its last value."""
  return {r["step"]: r["train/loss"]
          for r in metrics.read_jsonl(storage.join(workdir, "metrics.jsonl")) if "train/loss" in r}


def _logged_steps(workdir):
  return [r["step"] for r in metrics.read_jsonl(storage.join(workdir, "metrics.jsonl"))]


def _tensorboard_losses(workdir, tmp_path):
  """{step: train/loss} as TensorBoard reads the workdir's event files (copied out)."""
  from tensorboard.backend.event_processing import event_accumulator
  from tensorboard.util import tensor_util
  local = tmp_path / "events"
  local.mkdir()
  for remote in storage.glob(workdir, "events.out.tfevents.*"):
    (local / storage.basename(remote)).write_bytes(storage.read_bytes(remote))
  out = {}
  for name in sorted(os.listdir(local)):
    acc = event_accumulator.EventAccumulator(str(local / name), size_guidance={"tensors": 0})
    acc.Reload()
    out.update({e.step: float(tensor_util.make_ndarray(e.tensor_proto))
                for e in acc.Tensors("train/loss")})
  return out


# --- (a) SIGTERM with --workdir=gs://: the checkpoint is committed to the bucket, the
# run resumes from it.

# Holds the run right after step PAUSE_AT_STEP's metrics row is written, until the
# test's SIGTERM arrives, so the signal lands at a known step.
_PAUSE_RUNNER = """
import os, sys, threading, time
sys.argv = [sys.argv[0]] + sys.argv[2:]
PAUSE_AT, MARKER = int(os.environ["PAUSE_AT_STEP"]), os.environ["PAUSE_MARKER"]
from phenaki_jax import metrics
from phenaki_jax.train import loop
got_sigterm = threading.Event()
real_on_sigterm = loop.PreemptionWatch._on_sigterm
def on_sigterm(self, signum, frame):
  got_sigterm.set()
  real_on_sigterm(self, signum, frame)
loop.PreemptionWatch._on_sigterm = on_sigterm
real_write = metrics.JsonlWriter.write_scalars
def write_scalars(self, step, scalars):
  real_write(self, step, scalars)
  if step == PAUSE_AT:
    open(MARKER, "w").close()
    deadline = time.time() + 120
    while not got_sigterm.is_set() and time.time() < deadline:
      time.sleep(0.02)
metrics.JsonlWriter.write_scalars = write_scalars
from absl import app
from phenaki_jax import main
app.run(main.main, flags_parser=main.parse_flags)
"""


def test_tokenizer_in_a_bucket_stops_on_sigterm_and_resumes_bitwise(
    bucket, uninterrupted_tokenizer, tmp_path):
  workdir = f"{bucket}/tok"
  runner, marker = tmp_path / "runner.py", tmp_path / "paused"
  runner.write_text(_PAUSE_RUNNER)
  proc = subprocess.Popen(
      [sys.executable, str(runner), "--", f"--workdir={workdir}", *uninterrupted_tokenizer.args],
      cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
      env={**os.environ, "PAUSE_AT_STEP": "4", "PAUSE_MARKER": str(marker)})
  try:
    deadline = time.time() + 240
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
      time.sleep(0.1)
    assert marker.exists(), proc.communicate(timeout=60)[0][-3000:]
    # The running job's metrics are in the bucket as it goes.
    assert _logged_steps(workdir) == [1, 2, 3, 4]
    proc.send_signal(signal.SIGTERM)
    log, _ = proc.communicate(timeout=120)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  assert proc.returncode == 0, log[-3000:]
  assert "preempted (SIGTERM) at step 4: checkpoint committed" in log, log[-3000:]
  assert checkpointing.finalized_steps(workdir) == [3, 4]
  assert storage.read_json(f"{workdir}/config.json")["total_steps"] == 10

  # Resumed from the bucket (in-process, the same config as the command line).
  out = train_cvivit.train_and_evaluate(tokenizer_config(), workdir)
  assert out["step"] == 10
  assert _logged_steps(workdir) == list(range(1, 11))  # from step 4: none redone, none lost
  whole = uninterrupted_tokenizer.workdir
  assert _losses(workdir) == _losses(whole)  # bitwise, every step
  assert batch_log.read(workdir) == batch_log.read(whole)  # the same batches
  # TensorBoard reads both runs' event files, written to the bucket through storage.py.
  tb = _tensorboard_losses(workdir, tmp_path)
  assert tb == {s: float(np.float32(v)) for s, v in _losses(whole).items()}


# --- (b) The generator on a tokenizer in a bucket, itself in a bucket; loading both back.

def test_generator_trains_and_loads_with_tokenizer_and_workdir_in_a_bucket(
    bucket, trained, generator):
  tok_local, gen_local = trained
  tok, gen = f"{bucket}/tok", f"{bucket}/gen"
  upload_folder(tok_local, tok)
  config = load_config("maskgit", "tiny")
  config.tokenizer.workdir = tok
  config.total_steps, config.eval_every_steps = 3, 0  # as the session's local generator
  train_maskgit.train_and_evaluate(config, gen)

  record = storage.read_json(f"{gen}/tokenizer.json")
  assert record["workdir"] == tok and record["step"] == generator.tokenizer.step
  assert storage.read_json(f"{gen}/config.json")["tokenizer"]["workdir"] == tok
  assert checkpointing.finalized_steps(gen) == checkpointing.finalized_steps(gen_local)
  # The tokenizer read from the bucket is the local one: the losses are bitwise equal.
  assert _losses(gen) == _losses(gen_local)

  loaded = Generator.load(gen)  # its tokenizer through the record: from the bucket too
  assert loaded.tokenizer_workdir == tok and loaded.step == generator.step
  cfg = generator.tokenizer.config.input
  frames = np.random.default_rng(0).integers(
      0, 256, (2, cfg.num_frames, cfg.resolution, cfg.resolution, 3), np.uint8)
  np.testing.assert_array_equal(loaded.tokenizer.encode(frames),
                                generator.tokenizer.encode(frames))
  prompts = ["a large red circle moves right", "a small blue square moves up"]
  opts = SamplingOptions(num_steps=4, max_steps=8)
  np.testing.assert_array_equal(loaded.sample_tokens(prompts, seed=3, options=opts),
                                generator.sample_tokens(prompts, seed=3, options=opts))


# --- (c) Storage faults: a bucket that does not exist; one that vanishes mid-run.

def test_a_missing_bucket_fails_before_anything_compiles_naming_it(gcs_emulator, monkeypatch):
  from phenaki_jax import main
  missing = f"gs://no-such-bucket-{uuid.uuid4().hex[:8]}"
  monkeypatch.setattr(sharding, "make_mesh",
                      lambda *a, **k: pytest.fail("got past the workdir check"))
  want = f"--workdir={missing}/tok: bucket {missing} does not exist"
  with pytest.raises(storage.StorageNotFoundError, match=want):
    main.run_job(tokenizer_config(), f"{missing}/tok")  # the command line's check
  with pytest.raises(storage.StorageNotFoundError, match=want):
    train_cvivit.train_and_evaluate(tokenizer_config(), f"{missing}/tok")  # the trainer's own


def test_the_command_line_says_in_one_line_which_bucket_is_missing(gcs_emulator):
  missing = f"gs://no-such-bucket-{uuid.uuid4().hex[:8]}"
  proc = subprocess.run([sys.executable, "-m", "phenaki_jax.main",
                         "--config=configs/cvivit.py:tiny", f"--workdir={missing}/tok"],
                        cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert proc.stderr.strip().splitlines()[-1] == (
      f"error: --workdir={missing}/tok: bucket {missing} does not exist "
      "(or these credentials cannot see it)"), proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr


def test_a_bucket_vanishing_mid_run_is_named_and_its_committed_checkpoints_resume(
    gcs_emulator, bucket, uninterrupted_tokenizer, monkeypatch):
  workdir = f"{bucket}/tok"
  folder = gcs_emulator.bucket_folder(bucket)
  real_write = metrics.JsonlWriter.write_scalars

  def write_scalars(self, step, scalars):
    if step == 5 and os.path.exists(folder):
      deadline = time.time() + 60  # step 3's asynchronous save commits first
      while 3 not in checkpointing.finalized_steps(workdir) and time.time() < deadline:
        time.sleep(0.05)
      os.rename(folder, folder + ".away")  # as if deleted, or our access to it revoked
    real_write(self, step, scalars)

  monkeypatch.setattr(metrics.JsonlWriter, "write_scalars", write_scalars)
  with pytest.raises(storage.StorageNotFoundError) as err:
    train_cvivit.train_and_evaluate(tokenizer_config(), workdir)
  # The first write after the fault names its object and the missing bucket.
  assert f"{workdir}/metrics.jsonl" in str(err.value), err.value
  assert f"bucket {bucket} does not exist" in str(err.value), err.value
  monkeypatch.undo()

  os.rename(folder + ".away", folder)  # the bucket is back: nothing committed was lost
  assert checkpointing.finalized_steps(workdir) == [3]
  out = train_cvivit.train_and_evaluate(tokenizer_config(), workdir)
  assert out["step"] == 10
  assert _logged_steps(workdir) == [1, 2, 3, 4] + list(range(4, 11))  # resumed from step 3
  assert _losses(workdir) == _losses(uninterrupted_tokenizer.workdir)  # bitwise
