"""The loop pieces both trainers share: restore, rngs, the non-finite skip, cadence, preemption.

Each trainer stays linear (train_cvivit.py, train_maskgit.py); what they do
alike lives here once: restoring or setting damaged checkpoints aside, the
step's randomness, skipping a step whose loss / gradients / update are not
finite, and after each step the log / eval / checkpoint cadence with the
non-finite streak check, SIGTERM and early stops (TrainLoop).
"""
from __future__ import annotations

import signal
import threading
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging

from phenaki_jax import batch_log, checkpointing, metrics, storage


def save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  if jax.process_index() == 0:
    storage.write_json(storage.join(workdir, "config.json"), config.to_dict())


def restore_or_set_aside(ckpt: checkpointing.Checkpointer, target: Any, data_iterator: Any,
                         config: ml_collections.ConfigDict) -> tuple[Any, int] | None:
  """The newest checkpoint that restores; with none usable, set them aside only if allowed.

  Newer steps skipped as damaged are moved aside (DIR.unusable-N): left in
  place, orbax would save no step up to them, and the run would go on
  without a checkpoint until it passed them. All processes agree on both.
  """
  try:
    restored = ckpt.restore_latest(target, data_iterator, config)
  except checkpointing.NoUsableCheckpointError:
    if not config.fresh_start_if_checkpoints_unusable:
      raise
    where = ckpt.set_aside()
    logging.warning("no checkpoint restored; as config.fresh_start_if_checkpoints_unusable "
                    "asks, they were moved to %s and training starts from scratch", where)
    return None
  if restored is not None and ckpt.skipped_steps:
    skipped = list(ckpt.skipped_steps)
    where = ckpt.set_aside_steps(skipped)
    logging.warning("checkpoint step(s) %s did not restore: moved to %s (kept for inspection) so "
                    "that this run saves those steps again", skipped, where)
  return restored


def step_rng(seed: int, step: jax.Array | int) -> jax.Array:
  """The step's randomness depends on (seed, step) only: a resumed run repeats it."""
  return jax.random.fold_in(jax.random.key(seed), step)


def finite_update(loss: jax.Array, grads: Any, *new_trees: Any) -> tuple[jax.Array, jax.Array]:
  """(finite, grad_norm): whether the step may be applied, and the gradients' global norm.

  A NaN/Inf loss, gradient or updated tree skips the step (see keep_if): every
  parameter, optimizer state and statistic stays as it was, so nothing
  non-finite is ever trained on or checkpointed.
  """
  grad_norm = optax.global_norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  for tree in new_trees:
    finite = finite & jnp.isfinite(optax.global_norm(tree))
  return finite, grad_norm


def keep_if(finite: jax.Array, new: Any, old: Any) -> Any:
  """`new` where the step was finite, else `old`, leaf by leaf."""
  return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)


def nonfinite_metrics(finite: jax.Array, grad_norm: jax.Array,
                      learning_rate: jax.Array) -> dict[str, jax.Array]:
  return {"train/grad_norm": grad_norm, "train/learning_rate": learning_rate,
          "train/nonfinite_step_fraction": 1.0 - finite.astype(jnp.float32)}


class NonFiniteTrainingError(RuntimeError):
  """Too many consecutive steps had a NaN/Inf loss, gradient or update."""


def check_nonfinite_streak(streak: int, step: int, limit: int, last_saved: int | None) -> None:
  if limit > 0 and streak >= limit:
    raise NonFiniteTrainingError(
        f"{streak} consecutive steps up to step {step} had a non-finite loss, gradient or "
        f"update (config.max_consecutive_nonfinite={limit}); they were skipped and nothing "
        f"non-finite was saved (newest checkpoint: step {last_saved}). Check the input data "
        "and the learning rate, then resume from that checkpoint.")


class PreemptionWatch:
  """Turns SIGTERM (and orbax's multi-host preemption notice) into a clean stop.

  With one process a SIGTERM sets a flag checked after every step. With
  several processes all must stop at the same step, so the decision comes
  from orbax/JAX's preemption sync point instead.
  """

  def __init__(self, ckpt: checkpointing.Checkpointer):
    self._ckpt = ckpt
    self._requested = False
    self._previous = None
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

  def _on_sigterm(self, signum, frame):  # pylint: disable=unused-argument
    logging.warning("SIGTERM received: saving a checkpoint after the current step")
    self._requested = True

  def reached(self, step: int) -> bool:
    if jax.process_count() > 1:
      return self._ckpt.reached_preemption(step)
    return self._requested

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None


class TrainLoop:
  """After each step: the non-finite streak, metric averages, log / eval / checkpoint, stops.

  with TrainLoop(...) as loop:  # closes (commits the last save) even after an error
    for step in loop.steps():
      batch = next(train_iter); loop.record_batch(step, kind, batch)
      state, step_metrics, nonfinite_streak = train_step(...)
      if loop.end_step(step, kind, state, step_metrics, nonfinite_streak, run_eval):
        break

  `per_kind`: metrics also averaged per batch kind (with the 4:1 image/video
  interleave a single logged step would always be the same kind);
  `finish_scalars` turns the interval's averages into what is logged.
  """

  def __init__(self, config: ml_collections.ConfigDict, workdir: str,
               ckpt: checkpointing.Checkpointer, writer: Any, train_iter: Any, *,
               start_step: int, resumed: bool, per_kind: Sequence[str],
               finish_scalars: Callable[[dict[str, float]], dict[str, float]] | None = None,
               stop_after_step: int | None = None):
    self._config = config
    self._ckpt = ckpt
    self._writer = writer
    self._train_iter = train_iter
    self._start_step = start_step
    self._per_kind = tuple(per_kind)
    self._finish = finish_scalars or (lambda scalars: scalars)
    self._stop_after_step = stop_after_step
    self._progress = metrics.ProgressLogger(config.total_steps, start_step)
    self._accumulator = metrics.StepAccumulator()
    self._preemption = PreemptionWatch(ckpt)
    self._hashes = batch_log.BatchHashLog(workdir, start_step)
    self._pending_streak = None
    self.last_saved = start_step if resumed else None
    self.last_scalars: dict[str, float] = {}
    self.eval_scalars: dict[str, float] = {}

  def steps(self) -> Iterator[int]:
    return iter(range(self._start_step + 1, self._config.total_steps + 1))

  def record_batch(self, step: int, kind: str, local_batch: Any) -> None:
    self._hashes.add(step, kind, local_batch)

  def _check_streak(self, streak: Any, step: int) -> None:
    check_nonfinite_streak(int(streak), step, self._config.max_consecutive_nonfinite,
                           self.last_saved)

  def end_step(self, step: int, kind: str, state: Any, step_metrics: Any,
               nonfinite_streak: jax.Array,
               run_eval: Callable[[int], dict[str, float]] | None) -> bool:
    """Everything due after `step`; True when the run stops here (checkpoint committed)."""
    config = self._config
    # The previous step's streak, checked one step late: by now that value
    # is computed, so reading it does not stall the device.
    if self._pending_streak is not None:
      self._check_streak(self._pending_streak, step - 1)
    self._pending_streak = nonfinite_streak
    self._accumulator.add(kind, dict(step_metrics))
    is_last = step == config.total_steps
    if step % config.log_every_steps == 0 or is_last:
      scalars = self._finish(self._accumulator.means(per_kind=self._per_kind))
      rate = self._progress.steps_per_sec(step)
      scalars["perf/steps_per_sec"] = rate
      scalars["perf/examples_per_sec"] = rate * config.input.batch_size
      self._writer.write_scalars(step, scalars)
      self._progress.log(step, scalars, rate)
      self._hashes.flush()
      self.last_scalars = scalars
    if run_eval is not None and (step % config.eval_every_steps == 0 or is_last):
      self.eval_scalars = run_eval(step)
    stopping = self._stop_after_step is not None and step >= self._stop_after_step
    preempted = self._preemption.reached(step)
    due = step % config.checkpoint_every_steps == 0 or is_last or preempted
    if due or stopping:
      if due:
        self._check_streak(self._pending_streak, step)
      self._hashes.flush()
      self._ckpt.save(step, state, self._train_iter, config, force=preempted)
      self.last_saved = step
      logging.info("checkpoint step %d: saving to %s%s", step, self._ckpt.directory,
                   " (in the background)" if config.async_checkpointing else "")
    if preempted:
      self._ckpt.wait()
      logging.warning("preempted (SIGTERM) at step %d: checkpoint committed, exiting; run the "
                      "same command again to resume", step)
      return True
    if stopping:
      logging.info("stopping after step %d as asked; run again to resume", step)
      return True
    return False

  def close(self) -> None:
    self._preemption.close()
    self._ckpt.close()
    self._writer.flush()

  def __enter__(self) -> "TrainLoop":
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    """close(); after an error, still let a checkpoint on its way commit, then re-raise."""
    if exc is None:
      self.close()
      return
    self._preemption.close()
    try:
      self._ckpt.close()
    except Exception as e:  # pylint: disable=broad-except
      logging.warning("after the error below, the checkpoint being saved did not commit "
                      "(%s: %s); the newest committed one is kept", type(e).__name__, e)
