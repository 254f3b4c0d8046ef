"""The training-loop section both trainers share: length, cadence, checkpoints, faults, EMA.

These are top-level keys (`config.total_steps`, `config.log_every_steps`, ...).
"""
from __future__ import annotations

import ml_collections

from phenaki_jax.config import errors


def defaults(total_steps: int) -> ml_collections.ConfigDict:
  """The loop keys of a trainer that runs `total_steps` steps."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.total_steps = total_steps
  c.log_every_steps = 50
  c.checkpoint_every_steps = 500
  c.keep_checkpoints = 3
  c.async_checkpointing = True
  # Steps with a NaN/Inf loss, gradient or update are skipped; this many in a
  # row stop the run with an error (0: never stop).
  c.max_consecutive_nonfinite = 5
  # When checkpoints exist but none restores, the run refuses to start; True
  # moves them to checkpoints.unusable-N and starts from scratch instead.
  c.fresh_start_if_checkpoints_unusable = False
  # Periodic evaluation on held-out examples (what it measures is the job's); 0 disables.
  c.eval_every_steps = 500
  c.num_eval_examples = 8
  # EMA of the trained weights, kept in the state (phenaki_jax/ema.py); evaluation,
  # Tokenizer.load and Generator.load use it.
  c.ema_decay = 0.999
  return c


# Checked by the job's validate_* together with the other sections' positive
# keys, before anything else (schema.py).
POSITIVE_KEYS = ("log_every_steps", "checkpoint_every_steps", "keep_checkpoints")
EVAL_POSITIVE_KEYS = ("num_eval_examples",)


def check(config: ml_collections.ConfigDict) -> None:
  """Length and fault tolerance (after POSITIVE_KEYS)."""
  errors.require(config.max_consecutive_nonfinite >= 0, "max_consecutive_nonfinite",
                 config.max_consecutive_nonfinite, "must be >= 0 (0: never stop)")
  errors.require(isinstance(config.total_steps, int) and config.total_steps >= 0,
                 "total_steps", config.total_steps, "must be a non-negative integer")


def check_eval(config: ml_collections.ConfigDict) -> None:
  """The eval cadence (after EVAL_POSITIVE_KEYS; the generator trainer checks it, the
  tokenizer trainer does not, yet)."""
  errors.require(config.eval_every_steps >= 0, "eval_every_steps", config.eval_every_steps,
                 "must be >= 0 (0: no eval)")


def check_ema(config: ml_collections.ConfigDict) -> None:
  errors.require(0.0 <= config.ema_decay < 1.0, "ema_decay", config.ema_decay,
                 "must be in [0, 1)")
