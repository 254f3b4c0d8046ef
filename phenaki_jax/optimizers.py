"""Optimizers and learning-rate schedules built from `config.optimizer`."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
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


def _adamw(opt: ml_collections.ConfigDict, total_steps: int, scale: float):
  schedule = learning_rate_schedule(opt, total_steps)
  return optax.adamw(lambda step: scale * schedule(step), b1=float(opt.b1), b2=float(opt.b2),
                     weight_decay=float(opt.weight_decay), mask=decay_mask)


def make_optimizer(opt: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
  """Gradient clipping + AdamW; parameters outside the transformer stacks
  (patch embeddings and projections, codebook) can take a larger learning
  rate (opt.io_lr_multiplier): they train stably at rates that would
  destabilise the attention blocks, and they set how fast the first
  reconstructions appear.
  """
  parts = []
  if opt.grad_clip_norm and opt.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(float(opt.grad_clip_norm)))
  multiplier = float(opt.get("io_lr_multiplier", 1.0))
  if multiplier == 1.0:
    parts.append(_adamw(opt, total_steps, 1.0))
  else:
    def labels(params):
      return jax.tree_util.tree_map_with_path(
          lambda path, _: "stack" if any(getattr(k, "key", None) in STACK_NAMES for k in path)
          else "io", params)
    parts.append(optax.multi_transform(
        {"stack": _adamw(opt, total_steps, 1.0), "io": _adamw(opt, total_steps, multiplier)},
        labels))
  return optax.chain(*parts)


# Top-level submodules holding transformer stacks (see models/cvivit.py).
STACK_NAMES = ("encoder", "decoder", "transformer")


def reset_rows(opt_state: Any, param_path: tuple[str, ...], rows: jax.Array) -> Any:
  """The optimizer state of `rows` (bool, first axis) of one parameter, as for a new row.

  For restarted codebook entries: a code put at a fresh encoder vector must
  not move with the momentum of the code it replaced. Every leaf of the
  state that mirrors the parameter (Adam's mu and nu, under any chain or
  multi_transform) is found by its path ending in `param_path`. First
  moments (and any other per-parameter state) become 0; second moments (nu)
  become the mean of the other rows', so the new row's first steps are the
  size of a live row's rather than Adam's bias-corrected 1/sqrt(1 - b2)
  overshoot of a zero nu.
  """
  keys = tuple(param_path)

  def reset(path, leaf):
    names = tuple(getattr(k, "key", None) for k in path[-len(keys):])
    if names != keys or getattr(leaf, "shape", (None,))[:1] != rows.shape[:1]:
      return leaf
    fill = jnp.zeros_like(leaf)
    if any(getattr(k, "name", None) == "nu" for k in path):
      kept = (~rows).reshape((-1,) + (1,) * (leaf.ndim - 1)).astype(leaf.dtype)
      mean = jnp.sum(leaf * kept, axis=0) / jnp.maximum(jnp.sum(kept), 1)
      fill = jnp.broadcast_to(mean, leaf.shape)
    return jnp.where(rows.reshape((-1,) + (1,) * (leaf.ndim - 1)), fill, leaf)

  return jax.tree_util.tree_map_with_path(reset, opt_state)
