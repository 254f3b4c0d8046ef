"""Multi-process start-up (one call, before anything touches a device) and the waits all share.

`initialize()` decides how this process joins a multi-process job and calls
`jax.distributed.initialize` accordingly:

- explicit: `--coordinator_address`, `--num_processes`, `--process_id` (or
  the env vars PHENAKI_COORDINATOR, PHENAKI_NUM_PROCESSES, PHENAKI_PROCESS_ID;
  flags win) for GPU clusters, several CPU processes on one machine, or
  anything else;
- Cloud TPU: detected from the TPU runtime's env vars (TPU_WORKER_HOSTNAMES /
  TPU_PROCESS_ADDRESSES listing more than one host, MEGASCALE_* for
  multislice, CLOUD_TPU_TASK_ID, TPU_ACCELERATOR_TYPE); JAX then reads the
  topology itself. A plain TPU VM pod sets none of these in every shell, so
  launch/tpu_pod.sh passes `--distributed=on`;
- SLURM: SLURM_JOB_ID with more than one task in the job step; JAX reads the
  coordinator and ranks from SLURM's variables;
- otherwise a single process, and nothing is called.

`--num_cpu_devices=N` sets `jax_num_cpu_devices` first, so one machine can
simulate N devices per process (tests, mesh experiments).

A dead peer ends the job, within about `--distributed_heartbeat_timeout_s`
(60 s): a collective with the dead process fails at once in the others, but
what ends them is JAX's coordination service, which declares a process dead
once its heartbeats stop for that long and then aborts every other process
(SIGABRT, non-zero exit) wherever it is waiting: in a collective, in a
checkpoint barrier, or in the shutdown barrier at exit (measured on CPU with
gloo: 10 s of heartbeat timeout -> the survivor exits 10.3 s after its peer's
SIGKILL). JAX's own default is 100 s. Too short a timeout declares a live but
stalled host dead (a long GC pause, an overloaded machine); the heartbeats come
from a native thread, so compiling or a long step does not delay them.
`--distributed_shutdown_timeout_s` bounds how long a process that finished waits
at exit for the others to finish too (a slow host writing its last checkpoint).

After start-up: `wait_for_all(name)` (a barrier of the coordination service),
and `CompiledTogether(jax.jit(...), name)`, a jitted function whose new
programs every process compiles before any of them runs one.
"""
from __future__ import annotations

import dataclasses
import importlib
import os
import socket
import threading
import time
from typing import Mapping

import jax
from absl import flags, logging

_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None,
    "host:port of process 0's coordinator for a multi-process job (env PHENAKI_COORDINATOR).")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Number of processes in the job (env PHENAKI_NUM_PROCESSES).")
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "This process's index, 0 … num_processes-1 (env PHENAKI_PROCESS_ID).")
_TIMEOUT_S = flags.DEFINE_integer(
    "distributed_timeout_s", 300,
    "Seconds to wait for the coordinator and all processes at start-up.")
_HEARTBEAT_TIMEOUT_S = flags.DEFINE_integer(
    "distributed_heartbeat_timeout_s", 60,
    "Seconds without heartbeats after which a process counts as dead and the job ends "
    "(every other process exits with an error).")
_SHUTDOWN_TIMEOUT_S = flags.DEFINE_integer(
    "distributed_shutdown_timeout_s", 300,
    "Seconds a finished process waits at exit for the other processes to finish.")
_NUM_CPU_DEVICES = flags.DEFINE_integer(
    "num_cpu_devices", None,
    "Simulated CPU devices per process (sets jax_num_cpu_devices before any device use).")
_MODE = flags.DEFINE_enum(
    "distributed", "auto", ["auto", "on", "off"],
    "auto: explicit flags/env, else detect Cloud TPU / SLURM, else one process; "
    "on: always call jax.distributed.initialize (JAX detects the cluster); off: never.")

ENV_COORDINATOR = "PHENAKI_COORDINATOR"
ENV_NUM_PROCESSES = "PHENAKI_NUM_PROCESSES"
ENV_PROCESS_ID = "PHENAKI_PROCESS_ID"


class DistributedInitError(RuntimeError):
  """This process could not join the multi-process job."""


@dataclasses.dataclass(frozen=True)
class Plan:
  """How this process starts: `kind` is 'single', 'explicit', 'cloud_tpu', 'slurm' or 'cluster'."""
  kind: str
  reason: str
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None

  @property
  def is_distributed(self) -> bool:
    return self.kind != "single"


def _int_or_none(value: str | int | None, name: str) -> int | None:
  if value is None or value == "":
    return None
  try:
    return int(value)
  except ValueError:
    raise DistributedInitError(f"{name}={value!r}: not an integer") from None


def _host_count(hostnames: str | None) -> int:
  return len([h for h in (hostnames or "").split(",") if h.strip()])


def _cloud_tpu_reason(env: Mapping[str, str]) -> str | None:
  """Why this looks like a multi-host Cloud TPU job, or None."""
  if int(env.get("MEGASCALE_NUM_SLICES", "1") or 1) > 1 or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return "MEGASCALE_* (multislice) is set"
  for key in ("TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES"):
    if key in env:
      # Listed hosts are authoritative: one host needs no coordination.
      return f"{key} lists {_host_count(env[key])} hosts" if _host_count(env[key]) > 1 else None
  for key in ("CLOUD_TPU_TASK_ID", "TPU_ACCELERATOR_TYPE"):
    if env.get(key):
      return f"{key}={env[key]} is set"
  return None


def _slurm_reason(env: Mapping[str, str]) -> str | None:
  if not env.get("SLURM_JOB_ID"):
    return None
  # The step's task count: a batch script that runs python directly (not
  # through srun) is one task even when the job asked for several.
  tasks = env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or env.get("SLURM_NPROCS")
  if _int_or_none(tasks, "SLURM_NTASKS") is None or int(tasks) <= 1:
    return None
  return f"SLURM job {env['SLURM_JOB_ID']} with {tasks} tasks"


def plan(*, coordinator_address: str | None = None, num_processes: int | None = None,
         process_id: int | None = None, mode: str = "auto",
         env: Mapping[str, str] | None = None) -> Plan:
  """Decides how to start from flags (given here) and `env`; touches nothing."""
  env = os.environ if env is None else env
  if mode not in ("auto", "on", "off"):
    raise DistributedInitError(f"--distributed={mode!r}: expected auto, on or off")
  if mode == "off":
    return Plan("single", "--distributed=off")
  coordinator = coordinator_address or env.get(ENV_COORDINATOR) or None
  count = num_processes if num_processes is not None else _int_or_none(
      env.get(ENV_NUM_PROCESSES), ENV_NUM_PROCESSES)
  index = process_id if process_id is not None else _int_or_none(
      env.get(ENV_PROCESS_ID), ENV_PROCESS_ID)

  if coordinator is not None or count is not None or index is not None:
    if count is not None and count < 1:
      raise DistributedInitError(f"--num_processes={count}: must be at least 1")
    if count == 1 and index in (None, 0):
      return Plan("single", "--num_processes=1")
    missing = [name for name, v in (("--coordinator_address", coordinator),
                                    ("--num_processes", count), ("--process_id", index))
               if v is None]
    if missing:
      raise DistributedInitError(
          f"a multi-process start needs --coordinator_address, --num_processes and --process_id "
          f"(or {ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID}); missing "
          f"{', '.join(missing)}")
    if not 0 <= index < count:
      raise DistributedInitError(f"--process_id={index}: must be in 0 … {count - 1} "
                                 f"(--num_processes={count})")
    if ":" not in coordinator:
      raise DistributedInitError(f"--coordinator_address={coordinator!r}: expected host:port")
    return Plan("explicit", "coordinator given", coordinator, count, index)

  if mode == "on":
    return Plan("cluster", "--distributed=on")
  reason = _cloud_tpu_reason(env)
  if reason:
    return Plan("cloud_tpu", reason)
  reason = _slurm_reason(env)
  if reason:
    return Plan("slurm", reason)
  return Plan("single", "no coordinator given and no Cloud TPU or SLURM job detected")


def _split_host_port(address: str) -> tuple[str, int]:
  host, _, port = address.rpartition(":")
  return host.strip("[]"), int(port)


def _wait_for_coordinator(address: str, deadline: float) -> None:
  """Polls the coordinator's port: a clear Python error instead of a native abort.

  JAX's own wait ends in SIGABRT when the coordinator never answers; a peer
  started before process 0 just waits here.
  """
  host, port = _split_host_port(address)
  last_error: Exception | None = None
  while True:
    try:
      with socket.create_connection((host, port), timeout=2.0):
        return
    except OSError as e:
      last_error = e
    if time.monotonic() >= deadline:
      raise DistributedInitError(
          f"could not reach the coordinator at {address} ({type(last_error).__name__}: "
          f"{last_error}) within --distributed_timeout_s: is process 0 running with "
          f"--coordinator_address={address}, and is that port open from here?")
    time.sleep(0.5)


def _describe(p: Plan) -> str:
  if p.kind == "explicit":
    return (f"process {p.process_id} of {p.num_processes} with coordinator "
            f"{p.coordinator_address}")
  return f"{p.kind} cluster ({p.reason})"


def _set_num_cpu_devices(n: int) -> None:
  if n < 1:
    raise DistributedInitError(f"--num_cpu_devices={n}: must be at least 1")
  try:
    jax.config.update("jax_num_cpu_devices", n)
  except RuntimeError as e:
    raise DistributedInitError(f"--num_cpu_devices={n}: too late, the JAX backend is already "
                               f"initialised ({e})") from None
  # An XLA_FLAGS device count would fight the config option; the option wins
  # on the CPU backend, but say so instead of leaving two numbers around.
  if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
    logging.warning("--num_cpu_devices=%d overrides --xla_force_host_platform_device_count in "
                    "XLA_FLAGS", n)


def initialize(*, coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, timeout_s: int = 300,
               num_cpu_devices: int | None = None, mode: str = "auto",
               env: Mapping[str, str] | None = None, heartbeat_timeout_s: int = 60,
               shutdown_timeout_s: int = 300) -> Plan:
  """Joins the multi-process job if there is one; logs the process and device layout.

  Must run before anything uses a device. Raises DistributedInitError naming
  the coordinator when it cannot be reached in `timeout_s` seconds. Once
  joined, a process whose heartbeats stop for `heartbeat_timeout_s` ends the
  job (module docstring).
  """
  if num_cpu_devices:
    _set_num_cpu_devices(num_cpu_devices)
  p = plan(coordinator_address=coordinator_address, num_processes=num_processes,
           process_id=process_id, mode=mode, env=env)
  if p.is_distributed and not jax.distributed.is_initialized():
    _join(p, timeout_s, heartbeat_timeout_s, shutdown_timeout_s)
  how = (f"coordinator {p.coordinator_address}" if p.kind == "explicit"
         else f"{p.kind}: {p.reason}")
  logging.info("process %d of %d (%s); devices: %d local, %d global (%s)", jax.process_index(),
               jax.process_count(), how,
               jax.local_device_count(), jax.device_count(), jax.default_backend())
  return p


def _join(p: Plan, timeout_s: int, heartbeat_timeout_s: int, shutdown_timeout_s: int) -> None:
  for name, value in (("--distributed_timeout_s", timeout_s),
                      ("--distributed_heartbeat_timeout_s", heartbeat_timeout_s),
                      ("--distributed_shutdown_timeout_s", shutdown_timeout_s)):
    if value < 1:
      raise DistributedInitError(f"{name}={value}: must be at least 1")
  start = time.monotonic()
  logging.info("joining the multi-process job as %s (timeout %d s; a process silent for %d s "
               "ends the job)", _describe(p), timeout_s, heartbeat_timeout_s)
  if p.kind == "explicit" and p.process_id != 0:
    _wait_for_coordinator(p.coordinator_address, start + timeout_s)
  remaining = max(1, int(round(timeout_s - (time.monotonic() - start))))
  # When a peer never arrives, JAX aborts the process from native code after
  # the timeout (no Python exception): say beforehand what we were waiting for.
  where = p.coordinator_address or "the coordinator JAX derives from the cluster"
  warning = threading.Timer(max(0.5, remaining - 1.0), _report_stuck, args=(p, where, timeout_s))
  warning.daemon = True
  warning.start()
  timeouts = dict(initialization_timeout=remaining, heartbeat_timeout_seconds=heartbeat_timeout_s,
                  shutdown_timeout_seconds=shutdown_timeout_s)
  try:
    if p.kind == "explicit":
      jax.distributed.initialize(coordinator_address=p.coordinator_address,
                                 num_processes=p.num_processes, process_id=p.process_id,
                                 **timeouts)
    else:
      jax.distributed.initialize(**timeouts)
  except Exception as e:  # pylint: disable=broad-except
    raise DistributedInitError(f"jax.distributed.initialize failed for {_describe(p)} at {where}: "
                               f"{type(e).__name__}: {e}") from e
  finally:
    warning.cancel()
  _use_barriers_with_timeouts_in_orbax()


def _use_barriers_with_timeouts_in_orbax() -> None:
  """Orbax's checkpoint barriers through the coordination service (unless the user chose).

  Orbax's default barrier is a device collective: on the CPU backend (gloo)
  it fails when a peer is 30 s late, elsewhere it waits forever. The
  coordination service's barrier waits for Orbax's own timeout, then fails.
  """
  try:
    flag = flags.FLAGS["experimental_orbax_use_distributed_barrier"]
  except KeyError:  # orbax not imported yet: import it so its flag exists
    importlib.import_module("orbax.checkpoint")
    try:
      flag = flags.FLAGS["experimental_orbax_use_distributed_barrier"]
    except KeyError:
      return  # an Orbax without the option
  if not flag.present:
    flag.value = True


def _report_stuck(p: Plan, where: str, timeout_s: int) -> None:
  message = (f"error: multi-process start-up ({_describe(p)}) has not completed after about "
             f"{timeout_s} s (--distributed_timeout_s): not every process reached the "
             f"coordinator at {where}. Check that all processes were started with the same "
             "coordinator address and process count, and see the other processes' logs. "
             "JAX aborts the process now.")
  logging.error("%s", message)
  logging.flush()


def initialize_from_flags() -> Plan:
  """initialize() with this module's absl flags (main.py calls this first)."""
  return initialize(coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
                    process_id=_PROCESS_ID.value, timeout_s=_TIMEOUT_S.value,
                    num_cpu_devices=_NUM_CPU_DEVICES.value, mode=_MODE.value,
                    heartbeat_timeout_s=_HEARTBEAT_TIMEOUT_S.value,
                    shutdown_timeout_s=_SHUTDOWN_TIMEOUT_S.value)


def wait_for_all(name: str, timeout_s: int | None = None) -> None:
  """Blocks until every process of the job reaches `name` (once per name and run).

  A barrier of the coordination service, not a collective: the CPU backend's
  collectives (gloo) give up when a peer comes more than 30 s late, which
  happens at start-up on a loaded machine (one process still importing or
  loading pretrained weights when the others reach the first collective).
  This waits up to `timeout_s` (default --distributed_timeout_s).
  """
  if jax.process_count() == 1:
    return
  from orbax.checkpoint import multihost  # pylint: disable=g-import-not-at-top
  timeout_s = timeout_s or (_TIMEOUT_S.value if flags.FLAGS.is_parsed() else _TIMEOUT_S.default)
  try:
    multihost.get_barrier_sync_fn()(key=f"phenaki_jax_{name}", timeout_ms=int(timeout_s * 1000))
  except Exception as e:  # pylint: disable=broad-except
    raise DistributedInitError(
        f"not every process reached '{name}' within {timeout_s} s (--distributed_timeout_s); "
        f"see the other processes' logs ({type(e).__name__}: {str(e)[:300]})") from e


# Compiling a big program can take minutes, and hosts finish it at different
# times; the first call's collectives must not start until all have.
COMPILE_WAIT_S = 3600


def _signature(args: tuple) -> tuple:
  """What makes jit compile a new program: the tree, each array's type and layout, other values."""
  leaves, tree = jax.tree.flatten(args)
  return tree, tuple((tuple(x.shape), str(x.dtype), getattr(x, "weak_type", False),
                      getattr(x, "sharding", None)) if hasattr(x, "shape") and hasattr(x, "dtype")
                     else (type(x), x) for x in leaves)


class CompiledTogether:
  """A jitted function whose every new program is compiled on each process before any runs it.

  On several processes, each first call with a new signature compiles the
  program ahead of time (`lower().compile()`, which the jitted call then
  reuses), then waits at a barrier for every process to have done the same,
  then runs. Without it a process that compiles faster enters the program's
  first collective while a slower one is still compiling: the CPU backend's
  collectives (gloo) fail once a peer is 30 s late, and jax 0.10.2 has no
  setting for that timeout; TPU and GPU collectives wait, but tie up the
  faster hosts just the same. Every process compiles the same programs in
  the same order (the same steps, batch kinds and evaluations), so the n-th
  new program has the same barrier name everywhere. On one process it is the
  jitted function, unchanged.
  """

  def __init__(self, jitted, name: str, timeout_s: int = COMPILE_WAIT_S):
    self._jitted, self._name, self._timeout_s = jitted, name, timeout_s
    self._seen: set[tuple] = set()

  def __call__(self, *args):
    if jax.process_count() > 1:
      key = _signature(args)
      if key not in self._seen:
        self._seen.add(key)
        self._jitted.lower(*args).compile()
        wait_for_all(f"compiled_{self._name}_{len(self._seen)}", self._timeout_s)
    return self._jitted(*args)

  def __getattr__(self, name: str):
    return getattr(self._jitted, name)  # the jitted function's own: lower, eval_shape, ...

  @property
  def programs(self) -> int:
    """How many programs were compiled together (0 on one process)."""
    return len(self._seen)
