"""Optimizers and learning-rate schedules built from `config.optimizer`."""
from __future__ import annotations

from typing import Any

import jax
import ml_collections
import optax


def learning_rate_schedule(opt: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warm-up, then cosine decay to end_learning_rate_ratio (or constant)."""
  warmup = max(0, min(int(opt.warmup_steps), max(total_steps - 1, 0)))
  peak = float(opt.learning_rate)
  if opt.schedule == "constant":
    after = optax.constant_schedule(peak)
  else:
    after = optax.cosine_decay_schedule(peak, decay_steps=max(total_steps - warmup, 1),
                                        alpha=float(opt.end_learning_rate_ratio))
  if warmup == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def decay_mask(params: Any) -> Any:
  """Weight decay on matrices ('kernel' leaves) only: not norms, biases, codebooks."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: any(getattr(k, "key", None) == "kernel" for k in path), params)


def make_optimizer(opt: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
  parts = []
  if opt.grad_clip_norm and opt.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(float(opt.grad_clip_norm)))
  parts.append(optax.adamw(learning_rate_schedule(opt, total_steps), b1=float(opt.b1),
                           b2=float(opt.b2), weight_decay=float(opt.weight_decay),
                           mask=decay_mask))
  return optax.chain(*parts)
