"""The optimizer section (`config.optimizer.*`): AdamW with warm-up and a cosine or constant schedule.

Read by phenaki_jax/optimizers.py make_optimizer; each trainer picks its rates.
"""
from __future__ import annotations

import ml_collections

from phenaki_jax.config import errors

SCHEDULES = ("cosine", "constant")


def defaults(learning_rate: float, warmup_steps: int, weight_decay: float,
             io_lr_multiplier: float) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.learning_rate = learning_rate
  c.warmup_steps = warmup_steps
  c.schedule = "cosine"  # 'cosine' or 'constant' after warm-up
  c.end_learning_rate_ratio = 0.1
  c.b1 = 0.9
  c.b2 = 0.99
  c.weight_decay = weight_decay
  c.grad_clip_norm = 1.0
  # Learning-rate factor for parameters outside the transformer stacks.
  c.io_lr_multiplier = io_lr_multiplier
  return c


def check_schedule(config: ml_collections.ConfigDict) -> None:
  """The schedule and the learning rate (all the tokenizer trainer checks, yet)."""
  o = config.optimizer
  errors.require(o.schedule in SCHEDULES, "optimizer.schedule", o.schedule,
                 "must be 'cosine' or 'constant'")
  errors.require(o.learning_rate > 0, "optimizer.learning_rate", o.learning_rate, "must be > 0")


def check(config: ml_collections.ConfigDict) -> None:
  """The schedule, the learning rate, the warm-up and the clipping norm."""
  check_schedule(config)
  o = config.optimizer
  errors.require(o.warmup_steps >= 0, "optimizer.warmup_steps", o.warmup_steps, "must be >= 0")
  errors.require(o.grad_clip_norm >= 0, "optimizer.grad_clip_norm", o.grad_clip_norm,
                 "must be >= 0 (0: no clipping)")
