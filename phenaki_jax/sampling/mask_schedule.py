"""Masking schedules of MaskGIT, for training and for iterative decoding.

The same function γ(r), with γ(0) = 1 (everything masked) and γ(1) = 0, drives
both sides: training masks a fraction γ(r) of the tokens with r ~ U(0, 1), and
decoding with S steps leaves floor(N·γ((s+1)/S)) tokens masked after step s.
Training on the whole range of ratios that decoding will visit is what lets a
model trained once sample with any number of steps.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from phenaki_jax.config.sampling import MASK_SCHEDULES as SCHEDULES


def mask_ratio(r: jax.Array | float, schedule: str = "cosine") -> jax.Array:
  """Fraction of tokens masked at progress r in [0, 1]: 1 at r = 0, 0 at r = 1.

  Args:
    r: progress, any shape; clipped to [0, 1].
    schedule: 'cosine' (cos(π r / 2), the MaskGIT and Phenaki choice),
      'linear' (1 - r) or 'square' (1 - r²).

  Returns:
    float32 array of r's shape.
  """
  r = jnp.clip(jnp.asarray(r, jnp.float32), 0.0, 1.0)
  if schedule == "cosine":
    return jnp.cos(0.5 * jnp.pi * r)
  if schedule == "linear":
    return 1.0 - r
  if schedule == "square":
    return 1.0 - r * r
  raise ValueError(f"unknown mask schedule {schedule!r}; expected one of {SCHEDULES}")


def num_masked(step: jax.Array | int, total_steps: jax.Array | int,
               num_tokens: jax.Array | int, schedule: str = "cosine") -> jax.Array:
  """Tokens still masked after decoding step `step` (0-based) of `total_steps`.

  Works on traced values, so one compiled decoder serves any step count. The
  last step always ends at zero, whatever rounding γ(1) ≈ 6e-17 would give.

  Args:
    step: 0-based step index; any shape broadcastable with the others.
    total_steps: number of decoding steps S ≥ 1.
    num_tokens: tokens masked before the first step (e.g. per example).
    schedule: see `mask_ratio`.

  Returns:
    int32 array, floor(num_tokens · γ((step + 1) / total_steps)).
  """
  step = jnp.asarray(step, jnp.int32)
  total_steps = jnp.asarray(total_steps, jnp.int32)
  num_tokens = jnp.asarray(num_tokens, jnp.int32)
  ratio = (step + 1).astype(jnp.float32) / total_steps.astype(jnp.float32)
  # The small slack keeps exact products (cos(π/3)·1000 = 500) from rounding
  # down to 499 through float32 error in cos.
  n = jnp.floor(num_tokens.astype(jnp.float32) * mask_ratio(ratio, schedule) + 1e-3)
  n = n.astype(jnp.int32)
  n = jnp.clip(n, 0, num_tokens)
  return jnp.where(step + 1 >= total_steps, 0, n)


def sample_mask(rng: jax.Array, shape: tuple[int, ...], schedule: str = "cosine",
                loss_region: jax.Array | None = None,
                num_frozen_frames: jax.Array | int = 0) -> jax.Array:
  """A training mask: per example, exactly round(γ(r)·n) of its n maskable tokens.

  r ~ U(0, 1) per example. A token is maskable when it lies in `loss_region`
  and not in the frozen prefix; at least one maskable token is masked (so every
  example has a loss term) unless it has none. The masked tokens are a uniform
  random subset of the maskable ones. The mask is also the loss weight, so the
  loss never leaves `loss_region` either.

  Args:
    rng: PRNG key.
    shape: (batch, token_frames, ...), e.g. (B, T, h, w); axis 1 is the token
      frame axis (with a flat (B, N) shape, a "frame" is one token).
    schedule: see `mask_ratio`.
    loss_region: optional bool, broadcastable to `shape`; e.g. only the first
      token frame for image examples packed into video-shaped batches.
    num_frozen_frames: int or int (B,) array: the first k token frames of each
      example are conditioning (a prefix from the previous segment) and are
      never masked.

  Returns:
    bool array of `shape`, True where the token is replaced by [MASK].
  """
  if len(shape) < 2:
    raise ValueError(f"shape must be (batch, token_frames, ...); got {shape}")
  batch = shape[0]
  ratio_rng, order_rng = jax.random.split(rng)
  eligible = jnp.ones(shape, jnp.bool_)
  if loss_region is not None:
    eligible = jnp.broadcast_to(jnp.asarray(loss_region, jnp.bool_), shape)
  frozen = jnp.broadcast_to(jnp.asarray(num_frozen_frames, jnp.int32), (batch,))
  frame = jax.lax.broadcasted_iota(jnp.int32, shape, 1)
  eligible &= frame >= frozen.reshape((batch,) + (1,) * (len(shape) - 1))

  flat = eligible.reshape(batch, -1)
  available = flat.sum(axis=1)
  gamma = mask_ratio(jax.random.uniform(ratio_rng, (batch,)), schedule)
  count = jnp.round(gamma * available.astype(jnp.float32)).astype(jnp.int32)
  count = jnp.clip(count, jnp.minimum(available, 1), available)

  # Rank the maskable tokens in a random order; ineligible ones sort last, so
  # the first `count` ranks are exactly `count` uniformly chosen maskable
  # tokens (a threshold on the scores could miss by ties).
  scores = jax.random.uniform(order_rng, flat.shape)
  scores = jnp.where(flat, scores, 2.0)
  rank = jnp.argsort(jnp.argsort(scores, axis=1), axis=1)
  return (rank < count[:, None]).reshape(shape)
