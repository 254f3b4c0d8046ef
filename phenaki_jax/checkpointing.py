"""Orbax checkpoints of the train state, the data iterator and the config.

One checkpoint step holds three items: `state` (sharded arrays), `data` (the
grain iterator position of every process) and `config` (JSON). Restoring walks
steps from newest to oldest and takes the first that restores, saying loudly
which steps it skipped: a finalized step can be damaged later (lost files) and
orbax's latest_step() still returns it.

With several processes the step restored is agreed: **all processes take the
newest step that every process can restore.** Each process reads its part of
a step with no barrier (the handlers directly, not CheckpointManager.restore),
then all exchange their outcome (`exchange`: the coordination service's
key-value store) and either all keep the step or all drop it and try the
next older one. Why not Orbax's restore: it ends in a barrier of a fixed name
that a process whose read raised skips, so that process's attempt at the next
older step meets the others in it, and they return different steps (seen
with 2 processes: process 0 at step 4, process 1 at step 2, both carrying
on). Why not "process 0 decides": a step process 0 reads can still be damaged
in another host's view (a data item only that host reads, a file lost on its
mount), and then all must drop it anyway. Every process runs the same
exchanges in the same order whatever its reads did, so none waits for one
that never comes: the candidates are the steps every process lists, the
shape check's verdict is shared, and each warning is the same text on every
process, the failing processes' errors included. A dead peer ends the job
(distributed.py's heartbeat timeout).

The data item holds one file per process (`process_I-of-N.json`). Restored by
a different number of processes (a 2-host checkpoint continued on 1 host, or
on a bigger slice), those files do not match the new per-process slices of
the data: the train state restores as usual, and the data iterator takes the
position the old processes shared (they all count the same number of local
batches), so the video/image interleave and the count of batches carry
over, but the examples each process reads differ from an uninterrupted run.
When the old processes' positions differ, the data starts from the
beginning. Either way a warning says so.
"""
from __future__ import annotations

import itertools
import json
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from orbax.checkpoint._src.metadata import array_metadata_store  # orbax pinned: setup.py
from orbax.checkpoint._src.multihost import multihost as ocp_multihost

from phenaki_jax import storage

# Orbax splits every replicated array into one slice per replica, so that the
# replicas write it together; each slice is an eager jax op of its own, which for
# a model's many small arrays (norms, biases, counters) costs far more than the
# write (figures: benchmarks/RESULTS.md, "Checkpoint saves"). Only arrays whose
# slices reach 1 MiB are split; otherwise Orbax's default handler.
MIN_REPLICA_SLICE_BYTES = 1 << 20
ocp.type_handlers.register_type_handler(
    jax.Array, ocp.type_handlers.ArrayHandler(
        array_metadata_store=array_metadata_store.Store(),
        min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES), override=True)


class NoUsableCheckpointError(RuntimeError):
  """Checkpoints exist but none of them restores."""


class CheckpointMismatchError(ValueError):
  """A checkpoint's arrays do not fit the model being restored (a config change)."""


class CheckpointRestoreError(RuntimeError):
  """A checkpoint step did not restore on at least one process (all processes raise it)."""


# How long a process waits for the others' part of an agreement (their reads
# of a step): far more than hosts reading one step ever differ by. A dead peer
# ends the job sooner (distributed.py's heartbeat timeout).
AGREEMENT_TIMEOUT_S = 600
_exchanges = itertools.count()  # every process runs the same exchanges in the same order


def exchange(value: Any, timeout_s: int = AGREEMENT_TIMEOUT_S) -> list[Any]:
  """`value` (JSON-able) of every process, in process order: all processes must call it.

  Through the coordination service's key-value store, not a device
  collective: no program to compile, any size of value, a timeout of our
  own, and on the CPU backend no gloo collective that fails when a peer comes
  more than 30 s late (one host still reading its shards of a step).
  """
  if jax.process_count() == 1:
    return [value]
  client = ocp_multihost.get_jax_distributed_client()
  key = f"phenaki_jax/checkpointing/{next(_exchanges)}"
  client.key_value_set(f"{key}/{jax.process_index()}", json.dumps(value))
  return [json.loads(client.blocking_key_value_get(f"{key}/{i}", timeout_s * 1000))
          for i in range(jax.process_count())]


def _failures(error: Exception | None) -> dict[int, str]:
  """{process: its error} for every process where it failed, alike on every process."""
  mine = None if error is None else f"{type(error).__name__}: {str(error)[:300]}"
  return {i: e for i, e in enumerate(exchange(mine)) if e is not None}


def _where(failed: dict[int, str]) -> str:
  if jax.process_count() == 1:
    return "this process"
  return f"process(es) {sorted(failed)} of {jax.process_count()}"


def _errors(failed: dict[int, str]) -> str:
  if jax.process_count() == 1:
    return "; ".join(failed.values())
  return "; ".join(f"process {i}: {e}" for i, e in sorted(failed.items()))


def agreed_steps(steps: list[int]) -> tuple[list[int], list[int]]:
  """(the steps every process lists, the others some process lists): alike on every process."""
  lists = [set(x) for x in exchange(sorted(int(s) for s in steps))]
  common = set.intersection(*lists)
  return sorted(common), sorted(set.union(*lists) - common)


def _path_name(path: tuple) -> str:
  """'params/encoder/kernel' for any pytree path: dict keys, attributes, indices alike.

  Orbax stores named tuples (optax states) as dicts and dataclasses by field,
  so names, not key types, make a saved tree and a target tree comparable.
  """
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def shapes_by_path(tree: Any) -> dict[str, tuple[int, ...]]:
  return {_path_name(p): tuple(getattr(x, "shape", ()))
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _flat_config(d: Any, prefix: str = "") -> dict[str, Any]:
  if not isinstance(d, dict):
    return {prefix: d}
  out = {}
  for k, v in d.items():
    out.update(_flat_config(v, f"{prefix}{k}."))
  return {k.rstrip("."): v for k, v in out.items()}


def changed_config_keys(saved: dict, current: dict, limit: int = 12) -> list[str]:
  """'model.width: 128 -> 256' for each key whose value differs (lists as tuples)."""
  norm = lambda v: tuple(norm(x) for x in v) if isinstance(v, (list, tuple)) else v
  a, b = _flat_config(saved), _flat_config(current)
  out = []
  for key in sorted(set(a) | set(b)):
    if norm(a.get(key, "<absent>")) != norm(b.get(key, "<absent>")):
      out.append(f"{key}: {a.get(key, '<absent>')!r} -> {b.get(key, '<absent>')!r}")
  return out[:limit] + ([f"... {len(out) - limit} more"] if len(out) > limit else [])


# Orbax's mark of a committed step on object storage (atomicity.CommitFileTemporaryPath).
COMMIT_SUCCESS_FILE = "commit_success.txt"


def finalized_steps(workdir: str) -> list[int]:
  """WORKDIR/checkpoints' finalised steps, read without creating anything (orbax would).

  Locally orbax writes a step under a temporary name and renames it when it
  is committed. On object storage (no atomic rename) it writes the step in
  place and commits it by writing COMMIT_SUCCESS_FILE last: a step being
  saved there is not finalised yet.
  """
  path = storage.join(workdir, "checkpoints")
  if not storage.isdir(path):
    return []
  steps = sorted(int(name) for name in storage.listdir(path) if name.isdigit())
  if storage.is_remote(path):
    steps = [s for s in steps
             if storage.exists(storage.join(path, str(s), COMMIT_SUCCESS_FILE))]
  return steps


def abstract_with_shardings(abstract_tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying the *target* shardings: what restore lays out."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      abstract_tree, shardings)


class Checkpointer:
  """Saves and restores (state, data iterator, config) under `directory`."""

  def __init__(self, directory: str, *, max_to_keep: int, async_save: bool = True):
    self.directory = storage.absolute(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        create=True,
        enable_async_checkpointing=async_save,
        # A SIGKILL mid-save leaves a tmp dir; clean it on the next start.
        cleanup_tmp_directories=True,
    )
    self._options = options
    self._manager = ocp.CheckpointManager(self.directory, options=options)
    self.skipped_steps: list[int] = []  # set by restore_latest

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, data_iterator: Any | None,
           config: ml_collections.ConfigDict | None = None, *, force: bool = False) -> bool:
    items = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    if config is not None:
      items["config"] = ocp.args.JsonSave(config.to_dict())
    return self._manager.save(step, args=ocp.args.Composite(**items), force=force)

  def _read(self, step: int, items: dict[str, Any]) -> dict[str, Any]:
    """Step's items read by this process alone, with no barrier: may raise here only."""
    path = epath.Path(self.directory) / str(step)
    if not path.exists():
      raise FileNotFoundError(f"checkpoint step {step} not found in {self.directory} (it has "
                              f"steps {self.all_steps()})")
    # A fresh handler each time: it keeps the item handlers of the first args it saw.
    handler = ocp.CompositeCheckpointHandler()
    try:
      return handler.restore(path, ocp.args.Composite(**items))
    finally:
      handler.close()

  def _restore_here(self, step: int, abstract_state: Any, data_iterator: Any | None,
                    partial: bool) -> Any:
    """This process's part of restoring `step` (its shards, its data position)."""
    if partial:
      restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_state)
      items = {"state": ocp.args.PyTreeRestore(item=abstract_state, restore_args=restore_args,
                                               partial_restore=True)}
    else:
      items = {"state": ocp.args.StandardRestore(abstract_state)}
    other_count = None
    if data_iterator is not None:
      other_count = self._data_saved_by_other_process_count(step)
      if other_count is None:
        items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self._read(step, items)
    if other_count is not None:
      self._carry_data_position(step, other_count, data_iterator)
    return restored["state"]

  def _try_restore(self, step: int, abstract_state: Any, data_iterator: Any | None,
                   partial: bool) -> tuple[Any, Exception | None, dict[int, str]]:
    """(state or None, this process's error, {process: error} where it failed): all call it."""
    state, error = None, None
    try:
      state = self._restore_here(step, abstract_state, data_iterator, partial)
    except Exception as e:  # pylint: disable=broad-except
      error = e
    return state, error, _failures(error)

  def restore(self, step: int, abstract_state: Any, data_iterator: Any | None = None, *,
              partial: bool = False) -> Any:
    """Step's state laid out as `abstract_state` says (and the data position, if given).

    `partial`: `abstract_state` is a dict naming only some of the state's
    fields (e.g. {'ema_params': ...}); only those are read. With several
    processes every one calls this together; if the step does not restore on
    any of them, all raise CheckpointRestoreError naming those processes.
    """
    state, error, failed = self._try_restore(step, abstract_state, data_iterator, partial)
    if failed:
      raise CheckpointRestoreError(f"checkpoint step {step} in {self.directory} does not "
                                   f"restore on {_where(failed)} ({_errors(failed)})") from error
    return state

  def _data_dir(self, step: int) -> epath.Path:
    return epath.Path(self.directory) / str(step) / "data"

  def _data_saved_by_other_process_count(self, step: int) -> int | None:
    """The process count that wrote step's data item, if it differs from ours."""
    index, count = jax.process_index(), jax.process_count()
    data_dir = self._data_dir(step)
    if (data_dir / f"process_{index}-of-{count}.json").exists():
      return None
    counts = set()
    for path in data_dir.glob("process_*-of-*.json") if data_dir.exists() else ():
      try:
        counts.add(int(path.name[:-len(".json")].rsplit("-of-", 1)[1]))
      except (IndexError, ValueError):
        continue
    # No files at all is damage, not a topology change: let the restore fail.
    return min(counts) if len(counts) == 1 else None

  def _carry_data_position(self, step: int, saved_count: int, data_iterator: Any) -> None:
    """Resumes the data position saved by `saved_count` processes in this process."""
    data_dir = self._data_dir(step)
    texts = [(data_dir / f"process_{i}-of-{saved_count}.json").read_text()
             for i in range(saved_count)]
    change = (f"checkpoint step {step} was written by {saved_count} process(es), this run has "
              f"{jax.process_count()}")
    try:
      states = [json.loads(t) for t in texts]
    except ValueError:
      states = None
    if states is None or any(s != states[0] for s in states):
      logging.warning("%s and their data positions differ: the data iterator starts from the "
                      "beginning (the train state is restored)", change)
      return
    try:
      if isinstance(data_iterator, grain.DataLoaderIterator):
        data_iterator.set_state(texts[0].encode())
      else:
        data_iterator.set_state(states[0])
    except Exception as e:  # pylint: disable=broad-except
      logging.warning("%s; its data position %s does not fit this pipeline (%s: %s): the data "
                      "iterator starts from the beginning", change, texts[0].strip(),
                      type(e).__name__, e)
      return
    if hasattr(data_iterator, "start_prefetch"):
      data_iterator.start_prefetch()
    logging.warning("%s: the data iterator continues at the shared position %s of this "
                    "process's new slice; the examples differ from an uninterrupted %d-process "
                    "run", change, json.dumps(states[0]), saved_count)

  def restore_config(self, step: int) -> dict:
    """Step's saved config, read by this process alone (no barrier: any process may call it)."""
    return self._read(step, {"config": ocp.args.JsonRestore()})["config"]

  def saved_shapes(self, step: int) -> dict[str, tuple[int, ...]]:
    """Array shapes by path of step's state, from its metadata (no array is read)."""
    handler = ocp.StandardCheckpointHandler()
    meta = handler.metadata(epath.Path(self.directory) / str(step) / "state")
    return shapes_by_path(getattr(meta, "item_metadata", meta))

  def check_fits(self, step: int, abstract_state: Any,
                 config: ml_collections.ConfigDict | None = None, *, partial: bool = False
                 ) -> None:
    """Raises CheckpointMismatchError naming the first array whose shape differs.

    Unreadable metadata is left to restore (that is damage, not a mismatch).
    """
    try:
      saved = self.saved_shapes(step)
    except Exception:  # pylint: disable=broad-except
      return
    target = shapes_by_path(abstract_state)
    differ = [k for k in target if k in saved and saved[k] != target[k]]
    missing = [k for k in target if k not in saved]
    unexpected = [] if partial else [k for k in saved if k not in target]
    if not (differ or missing or unexpected):
      return
    # Parameters first: they say what changed in the model.
    order = lambda keys: sorted(keys, key=lambda k: (not k.startswith("params/"),
                                                     list(target).index(k) if k in target else 0))
    lines = []
    if differ:
      first = order(differ)[0]
      lines.append(f"{first} is {saved[first]} in the checkpoint but {target[first]} in this "
                   f"model ({len(differ)} array(s) differ in shape)")
    if missing:
      lines.append(f"{len(missing)} array(s) of this model are not in the checkpoint, first "
                   f"{order(missing)[0]}")
    if unexpected:
      lines.append(f"{len(unexpected)} array(s) of the checkpoint are not in this model, "
                   f"first {sorted(unexpected)[0]}")
    if config is not None:
      try:
        changed = changed_config_keys(self.restore_config(step), config.to_dict())
      except Exception:  # pylint: disable=broad-except
        changed = ["(the checkpoint's config could not be read)"]
      if changed:
        lines.append("config keys changed since it was saved: " + "; ".join(changed))
    raise CheckpointMismatchError(
        f"checkpoint step {step} in {self.directory} does not fit this model: "
        + ". ".join(lines) + ". Use the config it was trained with, or another --workdir.")

  def set_aside(self) -> str:
    """Moves every checkpoint to DIR.unusable-N (kept for inspection) and starts empty."""
    self._manager.close()
    target = ""
    if jax.process_index() == 0:
      target = self._unused_aside_name()
      storage.rename(self.directory, target)
    self._sync("phenaki_jax_checkpoints_set_aside")
    self._manager = ocp.CheckpointManager(self.directory, options=self._options)
    return target

  def _check_fits_everywhere(self, step: int, abstract_state: Any,
                             config: ml_collections.ConfigDict | None, partial: bool) -> None:
    """check_fits on every process, the verdict shared: all raise or none does."""
    error = None
    try:
      self.check_fits(step, abstract_state, config, partial=partial)
    except CheckpointMismatchError as e:
      error = e
    failed = exchange(None if error is None else str(error))
    first = next((i for i, e in enumerate(failed) if e is not None), None)
    if first == jax.process_index():
      raise error
    if first is not None:
      raise CheckpointMismatchError(f"on process {first}: {failed[first]}")

  def restore_latest(self, abstract_state: Any, data_iterator: Any | None = None,
                     config: ml_collections.ConfigDict | None = None, *, partial: bool = False,
                     max_step: int | None = None) -> tuple[Any, int] | None:
    """Newest checkpoint that restores on every process, or None when there are none at all.

    Damaged steps are skipped with a warning naming them; if every step is
    damaged this raises rather than silently starting from scratch. A newest
    step whose arrays do not fit `abstract_state` raises
    CheckpointMismatchError naming the first differing array and, given
    `config`, the config keys that changed: older steps would not fit either.
    `partial` as in restore. `max_step`: only steps up to it are candidates.

    With several processes every one calls this together and all return the
    same step: the newest that every process lists and restores (module
    docstring). Afterwards `skipped_steps` holds the listed steps newer than
    the one restored (damaged, or not listed on every process), alike on
    every process: a trainer sets them aside, or orbax would not save them again.
    """
    self.skipped_steps = []
    listed = [s for s in self.all_steps() if max_step is None or s <= max_step]
    steps, partly_listed = agreed_steps(listed)
    if partly_listed:
      logging.warning("checkpoint step(s) %s in %s are not listed on every process: left out",
                      partly_listed, self.directory)
    if not steps:
      if partly_listed:
        raise NoUsableCheckpointError(
            f"no checkpoint step in {self.directory} is listed on every process (some list "
            f"{partly_listed}): is it one shared storage path on every host?")
      return None
    self._check_fits_everywhere(steps[-1], abstract_state, config, partial)
    failures = []
    for step in reversed(steps):
      state, error, failed = self._try_restore(step, abstract_state, data_iterator, partial)
      if not failed:
        if failures:
          logging.warning("checkpoint: restored step %d after skipping damaged step(s) %s",
                          step, [s for s, _, _ in failures])
        self.skipped_steps = sorted(s for s in set(steps) | set(partly_listed) if s > step)
        return state, step
      del state
      failures.append((step, failed, error))
      logging.warning("checkpoint step %d in %s does not restore on %s (%s); trying an older "
                      "one", step, self.directory, _where(failed), _errors(failed))
    details = "; ".join(f"step {s} on {_where(f)} ({_errors(f)[:300]})" for s, f, _ in failures)
    raise NoUsableCheckpointError(
        f"no checkpoint in {self.directory} restores ({details}); refusing to start from "
        "scratch: set config.fresh_start_if_checkpoints_unusable=True to move them aside "
        f"({self.directory}.unusable-N) and start over")

  def set_aside_steps(self, steps: list[int]) -> str:
    """Moves these steps into DIR.unusable-N (kept for inspection); all processes call it.

    Orbax saves no step at or below its latest one: a damaged newest step
    left in place would silently stop every save until training passes it.
    """
    self._manager.close()
    # Every process names the same folder: all look before process 0 makes it.
    target = self._unused_aside_name()
    self._sync("phenaki_jax_checkpoints_aside_name")
    if jax.process_index() == 0:
      storage.makedirs(target)
      for step in steps:
        source = storage.join(self.directory, str(step))
        if storage.exists(source):
          storage.rename(source, storage.join(target, str(step)))
    self._sync("phenaki_jax_checkpoints_set_aside_steps")
    self._manager = ocp.CheckpointManager(self.directory, options=self._options)
    return target

  def _unused_aside_name(self) -> str:
    n = 0
    while storage.exists(f"{self.directory}.unusable-{n}"):
      n += 1
    return f"{self.directory}.unusable-{n}"

  @staticmethod
  def _sync(name: str) -> None:
    """Every process waits here for all the others (an exchange of nothing but the name)."""
    exchange(name)

  def reached_preemption(self, step: int) -> bool:
    """True on every process at the same step once a preemption was signalled."""
    return self._manager.reached_preemption(step)

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
