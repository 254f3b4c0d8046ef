"""Faults on two processes: a dead peer, a checkpoint damaged in one host's view, a preemption.

In CI (cheap, no model): a peer SIGKILLed while the other waits for it in a
checkpoint agreement ends the other with an error within the heartbeat
timeout; an array file missing from one process's own copy of the
checkpoints gives both processes the same fallback step (orbax restores from
per-process paths; nothing is saved after); a SIGTERM to one process of two
stepping at different speeds stops both at the same step, through JAX's
preemption sync point, and both exit cleanly; a program one process compiles
seconds later than the other runs on neither until both have compiled it.

Marked slow (two launches of the trainer on 2 processes, ~70 s here): the
tiny tokenizer trains until its step-4 checkpoint is committed, then process
1 is SIGKILLed: process 0 must exit with an error within the heartbeat
timeout. Before the relaunch, step 4 is damaged in process 1's view only:
its data item (`checkpoints/4/data/process_1-of-2.json`, a file only process
1 reads) is truncated. The relaunch must resume both processes from step 2
(the newest step both restore), warn alike on both that step 4 does not
restore on process 1, set step 4 aside, train on and save step 4 again.

Also slow (~40 s): the trainer on 2 processes, process 1 SIGTERMed after step
2: both save the same step and exit 0; the next launch resumes from it.

Why the data item, not an array file, for the trainer: on one machine both
processes read the same files, and every array's data here is read by both.
Giving process 1 its own copy of the workdir would damage only its view, but
the run could not go on: a multi-process save needs one shared directory.
"""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from tests.integration.multiprocess_test import (COMMON_FLAGS, _free_port, _main, _run_together,
                                                 _start, _stop, _train_rows)

# Short enough to keep the kill test quick, long enough that a loaded CI
# machine's live processes are not declared dead.
HEARTBEAT_S = 15
# Process 0 must be gone this long after its peer's SIGKILL.
DEAD_PEER_EXIT_S = HEARTBEAT_S + 45
# Video batches only: an image batch (step 5) would be one more compile per process.
FLAGS = (*COMMON_FLAGS, f"--distributed_heartbeat_timeout_s={HEARTBEAT_S}",
         "--num_cpu_devices=1", "--config.mesh.shape=(2,1,1)", "--config.input.video_ratio=1.0")
DAMAGED = '{"next_ind'


def _commands(workdir: str, *flags: str) -> list[list[str]]:
  port = _free_port()
  return [_main(workdir, f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                f"--process_id={i}", *flags, common=FLAGS) for i in range(2)]


def _committed(workdir: str, step: int) -> bool:
  return os.path.isdir(os.path.join(workdir, "checkpoints", str(step)))


def _checkpoint_warnings(log: str) -> list[str]:
  """The checkpoint warnings of a log, without absl's prefix (time, thread, file)."""
  return [line.split("] ", 1)[-1] for line in log.splitlines()
          if line.startswith("W") and "] checkpoint" in line]


def _tails(logs: list[str], codes: list, texts: list[str]) -> str:
  return "\n".join(f"--- {path} (exit {c}) ---\n" + "\n".join(
      line for line in t.splitlines()[-30:] if not line.startswith("    @"))
      for path, c, t in zip(logs, codes, texts))


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
  """2 processes train until step 4 is committed; then process 1 is SIGKILLed."""
  root = tmp_path_factory.mktemp("multiprocess_faults")
  workdir = str(root / "run")
  logs = [str(root / f"killed_{i}.log") for i in range(2)]
  # Far more steps than run: still training when the kill comes.
  procs, handles = _start(_commands(workdir, "--config.total_steps=1000"), logs)
  start = time.monotonic()
  killed_after = exit_s = None
  try:
    while not _committed(workdir, 4):
      if time.monotonic() > start + 300 or any(p.poll() is not None for p in procs):
        break
      time.sleep(0.1)
    if all(p.poll() is None for p in procs):
      procs[1].send_signal(signal.SIGKILL)
      killed_after = time.monotonic() - start
      try:
        procs[0].wait(timeout=DEAD_PEER_EXIT_S)
        exit_s = time.monotonic() - start - killed_after
      except subprocess.TimeoutExpired:
        pass
  finally:
    texts = _stop(procs, handles, logs)
  tails = _tails(logs, [p.returncode for p in procs], texts)
  print(f"\n2 processes up to step 4's checkpoint: {killed_after} s; process 0 exited "
        f"{exit_s} s after its peer's SIGKILL")
  assert killed_after is not None, f"step 4 was never committed:\n{tails}"
  return root, workdir, procs[0].returncode, exit_s, tails


@pytest.mark.slow  # ~70 s here with the relaunch below (2 launches of 2 processes)
def test_killing_one_process_in_training_ends_the_other_with_an_error_in_bounded_time(killed):
  _, workdir, returncode, exit_s, tails = killed
  assert exit_s is not None, (f"process 0 still ran {DEAD_PEER_EXIT_S} s after process 1 was "
                              f"killed:\n{tails}")
  assert returncode != 0, tails
  assert _committed(workdir, 2) and _committed(workdir, 4)


@pytest.mark.slow
def test_the_relaunch_resumes_both_processes_from_the_newest_step_both_restore(killed):
  """Step 4 damaged for process 1 only: both take step 2, alike, and train on."""
  root, workdir, _, _, _ = killed
  with open(os.path.join(workdir, "checkpoints", "4", "data", "process_1-of-2.json"), "w") as f:
    f.write(DAMAGED)
  start = time.monotonic()
  logs = _run_together(_commands(workdir, "--config.total_steps=4"), str(root), "relaunch")
  print(f"\nrelaunch, steps 3-4 after the fallback: {time.monotonic() - start:.1f} s")
  warning = (f"checkpoint step 4 in {os.path.join(workdir, 'checkpoints')} does not restore on "
             "process(es) [1] of 2")
  for i, log in enumerate(logs):
    assert f"{warning} (process 1: JSONDecodeError" in log, f"process {i}: {log[-3000:]}"
    assert "checkpoint: restored step 2 after skipping damaged step(s) [4]" in log, i
    assert "resumed from step 2" in log, i
  # The same words on both processes, process 1's error included.
  assert _checkpoint_warnings(logs[0]) == _checkpoint_warnings(logs[1])
  # Step 4 set aside (kept for inspection), then saved again by the relaunch.
  aside = os.path.join(workdir, "checkpoints.unusable-0", "4", "data", "process_1-of-2.json")
  with open(aside) as f:
    assert f.read() == DAMAGED
  assert _committed(workdir, 4)
  assert [r["step"] for r in _train_rows(workdir)][-2:] == [3, 4]


# --- An array file missing in one process's view, at the Checkpointer level.

_WORKER = textwrap.dedent("""
    import os, shutil, sys
    import jax
    pid, port, root = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    jax.config.update("jax_num_cpu_devices", 2)
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                               process_id=pid, initialization_timeout=60,
                               heartbeat_timeout_seconds=15)
    import numpy as np
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding, PartitionSpec as P
    from phenaki_jax import checkpointing
    mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    sharding = NamedSharding(mesh, P("data"))
    state = lambda v: {"w": jax.make_array_from_callback(
        (8,), sharding, lambda index: np.full((8,), v, np.float32)[index])}
    shared = os.path.join(root, "checkpoints")
    ckpt = checkpointing.Checkpointer(shared, max_to_keep=5, async_save=False)
    for step in (2, 4):
      ckpt.save(step, state(float(step)), None)
    ckpt.close()
    # Process 1's view: a copy of the checkpoints without step 4's array data.
    mine = shared
    if pid == 1:
      mine = os.path.join(root, "process_1_view")
      shutil.copytree(shared, mine)
      for name in os.listdir(os.path.join(mine, "4", "state", "d")):
        os.remove(os.path.join(mine, "4", "state", "d", name))
    multihost_utils.sync_global_devices("views ready")
    ckpt = checkpointing.Checkpointer(mine, max_to_keep=5, async_save=False)
    abstract = {"w": jax.ShapeDtypeStruct((8,), np.float32, sharding=sharding)}
    restored, step = ckpt.restore_latest(abstract)
    value = float(np.asarray(restored["w"].addressable_data(0))[0])
    print(f"process {pid} restored step {step} value {value} skipped {ckpt.skipped_steps}")
    try:
      ckpt.restore(4, abstract)
    except checkpointing.CheckpointRestoreError as e:
      print(f"process {pid} step 4: {str(e)[:80]}")
    ckpt.close()
""")


def test_an_array_file_missing_in_one_view_makes_both_processes_take_the_same_step(tmp_path):
  port = _free_port()
  commands = [[sys.executable, "-c", _WORKER, str(i), str(port), str(tmp_path)] for i in range(2)]
  logs = _run_together(commands, str(tmp_path), "checkpointer")
  for i, log in enumerate(logs):
    assert f"process {i} restored step 2 value 2.0 skipped [4]" in log, log[-3000:]
    # An explicit step that does not restore on one process raises on both.
    assert f"process {i} step 4: checkpoint step 4 in " in log, log[-3000:]
    assert "does not restore on process(es) [1] of 2" in log, log[-3000:]


def test_heartbeat_and_shutdown_timeouts_must_be_positive():
  from phenaki_jax import distributed
  p = distributed.plan(coordinator_address="127.0.0.1:1", num_processes=2, process_id=0, env={})
  for heartbeat, shutdown, name in ((0, 300, "--distributed_heartbeat_timeout_s=0"),
                                    (60, 0, "--distributed_shutdown_timeout_s=0")):
    with pytest.raises(distributed.DistributedInitError, match=name):
      distributed._join(p, 10, heartbeat, shutdown)  # pylint: disable=protected-access


# --- A dead peer while the other waits for it, without a model.

_WAITER = textwrap.dedent("""
    import sys, time
    from phenaki_jax import checkpointing, distributed
    pid, port, heartbeat = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                           process_id=pid, timeout_s=60, heartbeat_timeout_s=heartbeat)
    print("joined", flush=True)
    if pid == 1:
      time.sleep(600)  # never takes part: killed by the test
    # Waits for process 1's outcome, as restore_latest does after its own read.
    checkpointing.exchange("my outcome")
    print("exchange returned", flush=True)
""")


def test_a_peer_killed_while_the_other_waits_for_it_ends_the_other_in_bounded_time(tmp_path):
  heartbeat = 10
  port = _free_port()
  logs = [str(tmp_path / f"waiter_{i}.log") for i in range(2)]
  procs, handles = _start([[sys.executable, "-c", _WAITER, str(i), str(port), str(heartbeat)]
                           for i in range(2)], logs)
  exit_s = None
  try:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not all(
        "joined" in open(path).read() for path in logs):
      if any(p.poll() is not None for p in procs):
        break
      time.sleep(0.2)
    time.sleep(1.0)  # process 0 is waiting in the exchange by now
    if all(p.poll() is None for p in procs):
      procs[1].send_signal(signal.SIGKILL)
      killed_at = time.monotonic()
      try:
        procs[0].wait(timeout=heartbeat + 45)
        exit_s = time.monotonic() - killed_at
      except subprocess.TimeoutExpired:
        pass
  finally:
    texts = _stop(procs, handles, logs)
  tails = _tails(logs, [p.returncode for p in procs], texts)
  print(f"\nprocess 0 exited {exit_s} s after its peer's SIGKILL (heartbeat timeout {heartbeat} s)")
  assert exit_s is not None, f"process 0 still waited {heartbeat + 45} s after the kill:\n{tails}"
  assert procs[0].returncode != 0 and "exchange returned" not in texts[0], tails


# --- A preemption notice on one process stops every process at one step.

_PREEMPTED = textwrap.dedent("""
    import sys, time
    from phenaki_jax import checkpointing, distributed
    from phenaki_jax.train.loop import PreemptionWatch
    pid, port, root = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                           process_id=pid, timeout_s=60, heartbeat_timeout_s=15)
    ckpt = checkpointing.Checkpointer(root, max_to_keep=2, async_save=False)
    watch = PreemptionWatch(ckpt)
    print("ready", flush=True)
    for step in range(1, 1_000_000):
      time.sleep(0.005 * (1 + 2 * pid))  # process 1 steps three times slower
      if watch.reached(step):
        print(f"process {pid} stops after step {step}", flush=True)
        break
    watch.close()
    ckpt.close()
""")


def _wait_for(logs: list[str], procs, text: str, timeout_s: float) -> bool:
  deadline = time.monotonic() + timeout_s
  while time.monotonic() < deadline:
    if all(text in open(path).read() for path in logs):
      return True
    if any(p.poll() is not None for p in procs):
      return False
    time.sleep(0.2)
  return False


def _sigterm_process_1_once(procs, ready, timeout_s: float, exit_timeout_s: float) -> None:
  """Waits until ready() (or a process exits, or timeout_s), then SIGTERMs process 1 only
  and gives every process exit_timeout_s to exit."""
  deadline = time.monotonic() + timeout_s
  while not ready() and time.monotonic() < deadline:
    if any(p.poll() is not None for p in procs):
      return
    time.sleep(0.1)
  if any(p.poll() is not None for p in procs):
    return
  procs[1].send_signal(signal.SIGTERM)
  for p in procs:
    try:
      p.wait(timeout=exit_timeout_s)
    except subprocess.TimeoutExpired:
      pass


def test_a_sigterm_to_one_process_stops_both_after_the_same_step(tmp_path):
  port = _free_port()
  logs = [str(tmp_path / f"preempted_{i}.log") for i in range(2)]
  procs, handles = _start([[sys.executable, "-c", _PREEMPTED, str(i), str(port),
                            str(tmp_path / "checkpoints")] for i in range(2)], logs)
  try:
    if _wait_for(logs, procs, "ready", 120):
      time.sleep(1.0)  # both are stepping, process 0 well ahead
      _sigterm_process_1_once(procs, lambda: True, 0, 60)
  finally:
    texts = _stop(procs, handles, logs)
  tails = _tails(logs, [p.returncode for p in procs], texts)
  stops = [[line for line in t.splitlines() if " stops after step " in line] for t in texts]
  assert all(len(s) == 1 for s in stops), tails
  steps = [int(s[0].rsplit(" ", 1)[1]) for s in stops]
  assert steps[0] == steps[1] and steps[0] > 1, tails
  assert [p.returncode for p in procs] == [0, 0], tails


def _preempted_line(log: str) -> str:
  return next((line for line in log.splitlines() if "preempted (SIGTERM) at step" in line), "")


@pytest.mark.slow  # ~40 s here: two launches of the trainer on 2 processes
def test_the_trainer_on_two_processes_saves_one_step_on_a_sigterm_and_resumes_from_it(tmp_path):
  workdir = str(tmp_path / "run")
  logs = [str(tmp_path / f"sigterm_{i}.log") for i in range(2)]
  procs, handles = _start(_commands(workdir, "--config.total_steps=1000"), logs)
  try:
    _sigterm_process_1_once(procs, lambda: _committed(workdir, 2), 300, 120)
  finally:
    texts = _stop(procs, handles, logs)
  tails = _tails(logs, [p.returncode for p in procs], texts)
  assert [p.returncode for p in procs] == [0, 0], tails
  said = [_preempted_line(t).split("] ", 1)[-1] for t in texts]
  assert said[0] and said[0] == said[1], tails
  step = int(said[0].split("at step ", 1)[1].split(":")[0])
  assert step >= 2 and _committed(workdir, step), tails
  assert [r["step"] for r in _train_rows(workdir)][-1] == step
  logs = _run_together(_commands(workdir, f"--config.total_steps={step + 1}"), str(tmp_path),
                       "after_sigterm")
  assert all(f"resumed from step {step}" in log for log in logs), logs[0][-3000:]
  assert [r["step"] for r in _train_rows(workdir)][-1] == step + 1


# --- A slow compile on one host: nobody enters the program's collectives early.

_COMPILER = textwrap.dedent("""
    import json, sys, time
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from phenaki_jax import distributed
    pid, port, delay_s, together = int(sys.argv[1]), sys.argv[2], float(sys.argv[3]), sys.argv[4]
    distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                           process_id=pid, timeout_s=60, num_cpu_devices=1)
    mesh = jax.make_mesh((2,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    split, whole = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    times = {}

    class Timed:  # the jitted sum, compiling `delay_s` slower on process 1, its calls timed
      def __init__(self):
        self.jitted = jax.jit(jnp.sum, out_shardings=whole)
      def lower(self, *args):
        time.sleep(delay_s if pid == 1 else 0.0)
        lowered = self.jitted.lower(*args)
        times.setdefault("compiled", time.time())
        return lowered
      def __call__(self, *args):
        times.setdefault("runs", time.time())
        return self.jitted(*args)

    fn = distributed.CompiledTogether(Timed(), "sum") if together == "1" else Timed()
    if together != "1":
      fn.lower(jnp.zeros(4))  # compiles as slowly, then runs at once
    array = lambda n: jax.make_array_from_callback((n,), split, lambda i: np.arange(n, dtype=np.float32)[i])
    values = [float(fn(array(4))), float(fn(array(4))), float(fn(array(8)))]
    print("RESULT " + json.dumps({**times, "values": values,
                                   "programs": getattr(fn, "programs", None)}), flush=True)
""")


def _compile_run(tmp_path, together: bool, delay_s: float = 4.0,
                 timeout_s: int = 120) -> list[dict]:
  os.makedirs(tmp_path, exist_ok=True)
  port = _free_port()
  logs = _run_together([[sys.executable, "-c", _COMPILER, str(i), str(port), str(delay_s),
                         "1" if together else "0"] for i in range(2)], str(tmp_path),
                       f"compile_{int(together)}", timeout_s=timeout_s)
  return [json.loads(next(line for line in log.splitlines()
                          if line.startswith("RESULT "))[len("RESULT "):]) for log in logs]


def test_no_process_runs_a_new_program_before_every_process_compiled_it(tmp_path):
  fast, slow = _compile_run(tmp_path, together=True)
  assert fast["values"] == slow["values"] == [6.0, 6.0, 28.0]
  assert fast["programs"] == slow["programs"] == 2  # one per shape, not per call
  # Process 0 compiled 4 s sooner, and still ran only once process 1 had compiled.
  assert slow["compiled"] - fast["compiled"] > 3.0
  assert fast["runs"] >= slow["compiled"], (fast, slow)


@pytest.mark.slow  # ~120 s: the failing run stops at its 75 s bound, the other takes ~40 s
def test_a_35_s_compile_skew_fails_in_gloo_unless_compiled_together(tmp_path):
  """Why CompiledTogether exists: the CPU backend's collectives give up on a peer 30 s late."""
  with pytest.raises(pytest.fail.Exception, match="Gloo context initialization failed"):
    # The failed process waits at exit for its peer: the bound ends it.
    _compile_run(tmp_path / "plain", together=False, delay_s=35.0, timeout_s=75)
  fast, slow = _compile_run(tmp_path / "together", together=True, delay_s=35.0)
  assert fast["values"] == slow["values"] == [6.0, 6.0, 28.0]
