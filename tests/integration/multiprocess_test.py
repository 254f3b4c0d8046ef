"""Multi-process training on one machine, and resuming it on other meshes.

Two processes × 4 simulated CPU devices train the tiny tokenizer with a
(4, 2, 1) mesh and checkpoint; then one process resumes that checkpoint on 8
devices with a (2, 2, 2) mesh and another on 4 devices with (4, 1, 1). Both
continuations must see the same step-5 loss. The generator does the same on
that tokenizer's checkpoint. Also here: the start-up decisions of
phenaki_jax.distributed and the data-position hand-over when the process
count changes.
"""
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import grain
import jax
import numpy as np
import pytest

from phenaki_jax import checkpointing, distributed, metrics
from tests.helpers import REPO

PROCESS_TIMEOUT_S = 240
# Eval off: it would add a compile per run and is not what is tested here.
COMMON_FLAGS = ("--config=configs/cvivit.py:tiny,l2vq", "--config.checkpoint_every_steps=2",
                "--config.eval_every_steps=0", "--distributed_timeout_s=120")
# The generator on the tokenizer the two-process fixture trains (eval off, as above).
# Video batches only: image and story batches are other shapes, each one more
# compile of the step per process (~40 s here) and not what is tested.
GENERATOR_FLAGS = ("--config=configs/maskgit.py:tiny", "--config.checkpoint_every_steps=2",
                   "--config.eval_every_steps=0", "--config.input.video_ratio=1.0",
                   "--config.input.story_ratio=0.0", "--distributed_timeout_s=120")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _clean_env() -> dict:
  """The pytest process's env minus what would change device counts or cluster detection."""
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # conftest's 8 devices: --num_cpu_devices sets the count instead
  for key in list(env):
    if key.startswith(("PHENAKI_", "SLURM_", "TPU_", "MEGASCALE_", "CLOUD_TPU_")):
      env.pop(key)
  env.update(JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="3")
  return env


def _run_together(commands: list[list[str]], log_dir: str, name: str) -> list[str]:
  """Runs commands concurrently; kills them all as soon as one fails or time runs out.

  Returns their logs. A peer that died leaves the others waiting for the
  distributed timeout (and then aborting): killing them early keeps a failure fast.
  """
  logs = [os.path.join(log_dir, f"{name}_{i}.log") for i in range(len(commands))]
  handles = [open(path, "w") for path in logs]
  procs = [subprocess.Popen(cmd, cwd=REPO, env=_clean_env(), stdout=h, stderr=subprocess.STDOUT)
           for cmd, h in zip(commands, handles)]
  deadline = time.monotonic() + PROCESS_TIMEOUT_S
  failed = None
  try:
    while any(p.poll() is None for p in procs):
      failed = next((i for i, p in enumerate(procs) if p.poll() not in (None, 0)), None)
      if failed is not None or time.monotonic() > deadline:
        break
      time.sleep(0.5)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
      p.wait()
    for h in handles:
      h.close()
  texts = []
  for path in logs:
    with open(path) as f:
      texts.append(f.read())
  codes = [p.returncode for p in procs]
  if any(c != 0 for c in codes):
    tails = "\n".join(f"--- {path} (exit {c}) ---\n" + "\n".join(
        line for line in t.splitlines()[-40:] if not line.startswith("    @"))
        for path, c, t in zip(logs, codes, texts))
    timed_out = "" if failed is not None else f" or ran past {PROCESS_TIMEOUT_S} s"
    pytest.fail(f"{name}: a process failed{timed_out}: exit codes {codes}\n{tails}")
  return texts


def _main(workdir: str, *flags: str, common: tuple[str, ...] = COMMON_FLAGS) -> list[str]:
  return [sys.executable, "-m", "phenaki_jax.main", f"--workdir={workdir}", *common, *flags]


def _train_rows(workdir: str) -> list[dict]:
  return [r for r in metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
          if "train/loss" in r]


def _train_on_two_processes(root, name: str, common: tuple[str, ...], *flags: str):
  """Steps 1-4 with 2 processes × 4 devices, mesh (4, 2, 1); checkpoints at 2 and 4."""
  workdir = str(root / name)
  port = _free_port()
  commands = [_main(workdir, f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                    f"--process_id={i}", "--num_cpu_devices=4", "--config.total_steps=4",
                    "--config.mesh.shape=(4,2,1)", *flags, common=common) for i in range(2)]
  logs = _run_together(commands, str(root), name)
  return workdir, logs


def _check_two_process_run(workdir: str, logs: list[str]) -> None:
  for i, log in enumerate(logs):
    assert f"process {i} of 2 (coordinator 127.0.0.1:" in log
    assert "devices: 4 local, 8 global (cpu)" in log
  # One row per step: only process 0 writes metrics.
  rows = _train_rows(workdir)
  assert [r["step"] for r in rows] == [1, 2, 3, 4]
  assert all(np.isfinite(r["train/loss"]) for r in rows)
  assert len([f for f in os.listdir(workdir) if f.startswith("events.out.tfevents")]) == 1
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
  data_files = sorted(os.listdir(os.path.join(workdir, "checkpoints", "4", "data")))
  assert "process_0-of-2.json" in data_files and "process_1-of-2.json" in data_files


def _resume_on_8_and_4_devices(root, workdir: str, name: str, common: tuple[str, ...],
                               *flags: str) -> dict[str, float]:
  """Step 5 of a copy of `workdir` on 8 devices (2, 2, 2) and on 4 devices (4, 1, 1)."""
  runs = {"8dev": ("--num_cpu_devices=8", "--config.mesh.shape=(2,2,2)"),
          "4dev": ("--num_cpu_devices=4", "--config.mesh.shape=(4,1,1)")}
  before = len(_train_rows(workdir))
  workdirs = {}
  for run in runs:
    workdirs[run] = str(root / f"{name}_{run}")
    shutil.copytree(workdir, workdirs[run])
  logs = _run_together(
      [_main(workdirs[run], "--config.total_steps=5", *run_flags, *flags, common=common)
       for run, run_flags in runs.items()], str(root), name)
  losses = {}
  for run, log in zip(runs, logs):
    assert "resumed from step 4" in log, run
    # The 2-process data positions are handed over, not silently dropped.
    assert "written by 2 process(es), this run has 1" in log, run
    new_rows = _train_rows(workdirs[run])[before:]
    assert [r["step"] for r in new_rows] == [5], run
    losses[run] = new_rows[0]["train/loss"]
  return losses


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
  """The tiny tokenizer, steps 1-4 on 2 processes × 4 devices."""
  root = tmp_path_factory.mktemp("multiprocess")
  workdir, logs = _train_on_two_processes(root, "two_processes", COMMON_FLAGS)
  return root, workdir, logs


def test_two_processes_train_and_checkpoint(two_process_run):
  _, workdir, logs = two_process_run
  _check_two_process_run(workdir, logs)


def test_one_process_resumes_on_8_and_on_4_devices_alike(two_process_run):
  root, workdir, _ = two_process_run
  losses = _resume_on_8_and_4_devices(root, workdir, "resume", COMMON_FLAGS)
  assert np.isfinite(losses["8dev"])
  np.testing.assert_allclose(losses["8dev"], losses["4dev"], rtol=1e-4)


@pytest.fixture(scope="module")
def two_process_generator_run(two_process_run):
  """The tiny generator on that tokenizer (its step 4), steps 1-4 on 2 processes × 4 devices."""
  root, tokenizer_workdir, _ = two_process_run
  tokenizer_flag = f"--config.tokenizer.workdir={tokenizer_workdir}"
  workdir, logs = _train_on_two_processes(root, "generator_two_processes", GENERATOR_FLAGS,
                                          tokenizer_flag)
  return root, workdir, logs, tokenizer_flag


def test_generator_two_processes_train_and_checkpoint(two_process_generator_run):
  _, workdir, logs, _ = two_process_generator_run
  _check_two_process_run(workdir, logs)
  with open(os.path.join(workdir, "tokenizer.json")) as f:
    assert json.load(f)["step"] == 4


def test_generator_resumes_on_8_and_on_4_devices_alike(two_process_generator_run):
  root, workdir, _, tokenizer_flag = two_process_generator_run
  losses = _resume_on_8_and_4_devices(root, workdir, "generator_resume", GENERATOR_FLAGS,
                                      tokenizer_flag)
  assert np.isfinite(losses["8dev"])
  np.testing.assert_allclose(losses["8dev"], losses["4dev"], rtol=1e-4)


# --- Start-up decisions (no processes started).

@pytest.mark.parametrize("env,kind", [
    ({}, "single"),
    ({"TPU_WORKER_HOSTNAMES": "t-w-0"}, "single"),
    ({"TPU_WORKER_HOSTNAMES": "t-w-0,t-w-1,t-w-2,t-w-3"}, "cloud_tpu"),
    ({"TPU_ACCELERATOR_TYPE": "v5p-128"}, "cloud_tpu"),
    ({"CLOUD_TPU_TASK_ID": "3"}, "cloud_tpu"),
    ({"MEGASCALE_NUM_SLICES": "2", "TPU_WORKER_HOSTNAMES": "a"}, "cloud_tpu"),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}, "slurm"),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}, "single"),
    # A batch script running python itself is one task of a bigger job.
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "1"}, "single"),
    ({"PHENAKI_COORDINATOR": "h:1234", "PHENAKI_NUM_PROCESSES": "4",
      "PHENAKI_PROCESS_ID": "2", "SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}, "explicit"),
    ({"PHENAKI_NUM_PROCESSES": "1"}, "single"),
])
def test_plan_from_env(env, kind):
  assert distributed.plan(env=env).kind == kind


def test_plan_flags_win_over_env_and_are_checked():
  env = {"PHENAKI_COORDINATOR": "env:1", "PHENAKI_NUM_PROCESSES": "8", "PHENAKI_PROCESS_ID": "5"}
  p = distributed.plan(coordinator_address="flag:2", process_id=1, env=env)
  assert (p.kind, p.coordinator_address, p.num_processes, p.process_id) == ("explicit", "flag:2",
                                                                             8, 1)
  assert distributed.plan(mode="off", env=env).kind == "single"
  assert distributed.plan(mode="on", env={}).kind == "cluster"
  with pytest.raises(distributed.DistributedInitError, match="missing --process_id"):
    distributed.plan(coordinator_address="h:1", num_processes=2, env={})
  with pytest.raises(distributed.DistributedInitError, match="--process_id=2: must be in 0"):
    distributed.plan(coordinator_address="h:1", num_processes=2, process_id=2, env={})
  with pytest.raises(distributed.DistributedInitError, match="expected host:port"):
    distributed.plan(coordinator_address="h", num_processes=2, process_id=1, env={})


def test_unreachable_coordinator_is_a_clear_error():
  port = _free_port()  # nothing listens there
  with pytest.raises(distributed.DistributedInitError, match=f"coordinator at 127.0.0.1:{port}"):
    # pylint: disable-next=protected-access
    distributed._wait_for_coordinator(f"127.0.0.1:{port}", time.monotonic() + 1.0)


def test_peer_without_coordinator_exits_naming_it(tmp_path):
  port = _free_port()
  proc = subprocess.run(
      _main(str(tmp_path), f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
            "--process_id=1", "--distributed_timeout_s=2"),
      cwd=REPO, env=_clean_env(), capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert f"could not reach the coordinator at 127.0.0.1:{port}" in proc.stderr


# --- Data position when the process count changes.

def _saved_checkpoint(tmp_path, positions):
  """A checkpoint at step 1 whose data item looks written by len(positions) processes."""
  it = iter(grain.MapDataset.range(1000).batch(2).to_iter_dataset())
  ckpt = checkpointing.Checkpointer(str(tmp_path / "ckpt"), max_to_keep=2, async_save=False)
  state = {"w": jax.numpy.arange(4.0)}
  ckpt.save(1, state, it)
  ckpt.close()
  data_dir = tmp_path / "ckpt" / "1" / "data"
  os.remove(data_dir / "process_0-of-1.json")
  for i, position in enumerate(positions):
    (data_dir / f"process_{i}-of-{len(positions)}.json").write_text(
        json.dumps({"next_index": position}))
  return state


@pytest.mark.parametrize("positions,first_batch", [((3, 3), [6, 7]), ((3, 5), [0, 1])])
def test_data_position_from_other_process_count(tmp_path, positions, first_batch):
  state = _saved_checkpoint(tmp_path, positions)
  ckpt = checkpointing.Checkpointer(str(tmp_path / "ckpt"), max_to_keep=2, async_save=False)
  it = iter(grain.MapDataset.range(1000).batch(2).to_iter_dataset())
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          state)
  restored, step = ckpt.restore_latest(abstract, it)
  ckpt.close()
  assert step == 1
  np.testing.assert_array_equal(restored["w"], state["w"])
  # Agreeing positions carry over; disagreeing ones restart the data.
  np.testing.assert_array_equal(next(it), first_batch)
