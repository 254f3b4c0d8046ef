"""Orbax checkpoints of the train state, the data iterator and the config.

One checkpoint step holds three items: `state` (sharded arrays), `data` (the
grain iterator position of every process) and `config` (JSON). Restoring walks
steps from newest to oldest and takes the first that restores, saying loudly
which steps it skipped: a finalized step can be damaged later (lost files) and
orbax's latest_step() still returns it.
"""
from __future__ import annotations

import os
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging


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
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    return restored["state"]

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

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
