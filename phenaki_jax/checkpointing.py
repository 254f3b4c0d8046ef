"""Orbax checkpoints of the train state, the data iterator and the config.

One checkpoint step holds three items: `state` (sharded arrays), `data` (the
grain iterator position of every process) and `config` (JSON). Restoring walks
steps from newest to oldest and takes the first that restores, saying loudly
which steps it skipped: a finalized step can be damaged later (lost files) and
orbax's latest_step() still returns it.

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

import json
import os
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from etils import epath


class NoUsableCheckpointError(RuntimeError):
  """Checkpoints exist but none of them restores."""


def abstract_with_shardings(abstract_tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying the *target* shardings: what restore lays out."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      abstract_tree, shardings)


class Checkpointer:
  """Saves and restores (state, data iterator, config) under `directory`."""

  def __init__(self, directory: str, *, max_to_keep: int, async_save: bool = True):
    self.directory = os.path.abspath(directory) if "://" not in directory else directory
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        create=True,
        enable_async_checkpointing=async_save,
        # A SIGKILL mid-save leaves a tmp dir; clean it on the next start.
        cleanup_tmp_directories=True,
    )
    self._manager = ocp.CheckpointManager(self.directory, options=options)

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

  def restore(self, step: int, abstract_state: Any, data_iterator: Any | None = None) -> Any:
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    other_count = None
    if data_iterator is not None:
      other_count = self._data_saved_by_other_process_count(step)
      if other_count is None:
        items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    if other_count is not None:
      self._carry_data_position(step, other_count, data_iterator)
    return restored["state"]

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
    restored = self._manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    return restored["config"]

  def restore_latest(self, abstract_state: Any,
                     data_iterator: Any | None = None) -> tuple[Any, int] | None:
    """Newest checkpoint that restores, or None when there are none at all.

    Damaged steps are skipped with a warning naming them; if every step is
    damaged this raises rather than silently starting from scratch.
    """
    steps = self.all_steps()
    if not steps:
      return None
    failures = []
    for step in reversed(steps):
      try:
        state = self.restore(step, abstract_state, data_iterator)
      except Exception as e:  # pylint: disable=broad-except
        failures.append((step, e))
        logging.warning("checkpoint step %d in %s does not restore (%s: %s); trying an older one",
                        step, self.directory, type(e).__name__, str(e)[:300])
        continue
      if failures:
        logging.warning("restored step %d after skipping damaged step(s) %s", step,
                        [s for s, _ in failures])
      return state, step
    details = "; ".join(f"step {s}: {type(e).__name__}: {str(e)[:200]}" for s, e in failures)
    raise NoUsableCheckpointError(f"no checkpoint in {self.directory} restores ({details})")

  def reached_preemption(self, step: int) -> bool:
    """True on every process at the same step once a preemption was signalled."""
    return self._manager.reached_preemption(step)

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
