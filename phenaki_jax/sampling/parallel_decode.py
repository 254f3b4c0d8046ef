"""MaskGIT iterative parallel decoding as one compiled loop.

Each step predicts every masked token at once, samples them, and keeps only
the most confident ones; the rest go back to [MASK] so that the number still
masked follows the schedule (`mask_schedule.num_masked`) and reaches zero at the
last step. Shapes are static and the step count is a traced loop bound, so one
compilation serves every `num_steps` up to `max_steps`.

Typical use, compiled once for all step counts and guidance scales::

  @functools.partial(jax.jit, static_argnames=("max_steps",))
  def sample(params, text, text_mask, rng, num_steps, scale, max_steps=48):
    def fn(mask):  # conditional when mask is the text mask, else unconditional
      return flat_logits_fn(
          lambda t: model.apply({"params": params}, t, text, mask), grid)
    start = jnp.full((b, n), model.mask_id, jnp.int32)
    logits_fn = guided_logits_fn(fn(text_mask), fn(jnp.zeros_like(text_mask)), scale)
    out = decode(logits_fn, rng, start, num_steps, mask_id=model.mask_id,
                 max_steps=max_steps)
    return unflatten_tokens(out.tokens, grid)
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from phenaki_jax.sampling import mask_schedule

LogitsFn = Callable[[jax.Array], jax.Array]


class DecodeOutput(NamedTuple):
  """What `decode` returns.

  Attributes:
    tokens: int32 (B, N), no [MASK] left.
    num_masked: int32 (max_steps, B): tokens still masked after each step; rows
      past `num_steps` are -1. A trace of the schedule, for tests and debugging.
    token_history: int32 (max_steps, B, N) tokens after each step when
      `record_tokens=True` (rows past `num_steps` are -1), else None.
    seam_splits: int32 (max_steps, B) with seam blending: the split drawn at
      each step (prefix token frames before it were kept); rows past
      `num_steps` are -1. None without seam blending.
  """
  tokens: jax.Array
  num_masked: jax.Array
  token_history: jax.Array | None
  seam_splits: jax.Array | None = None


def flatten_tokens(tokens: jax.Array) -> jax.Array:
  """(B, T, h, w) -> (B, T·h·w), the order the sampler works in."""
  return tokens.reshape(tokens.shape[0], -1)


def unflatten_tokens(tokens: jax.Array, grid: tuple[int, ...]) -> jax.Array:
  """(B, N) -> (B, *grid), e.g. grid = (T, h, w)."""
  return tokens.reshape((tokens.shape[0],) + tuple(grid))


def flat_logits_fn(grid_logits_fn: LogitsFn, grid: tuple[int, ...]) -> LogitsFn:
  """Adapts a model over (B, *grid) tokens to the sampler's flat (B, N) view."""

  def fn(tokens: jax.Array) -> jax.Array:
    logits = grid_logits_fn(unflatten_tokens(tokens, grid))
    return logits.reshape(tokens.shape + logits.shape[-1:])

  return fn


def initial_tokens(tokens: jax.Array, frozen: jax.Array, mask_id: int) -> jax.Array:
  """Start state: `tokens` where `frozen` (e.g. a prefix of earlier frames), [MASK] elsewhere."""
  return jnp.where(frozen, tokens, mask_id).astype(jnp.int32)


def guided_logits_fn(cond_fn: LogitsFn, uncond_fn: LogitsFn,
                     scale: jax.Array | float) -> LogitsFn:
  """Classifier-free guidance: uncond + scale·(cond − uncond).

  scale = 1 is the conditional model, 0 the unconditional one, > 1 sharpens
  toward the text. `scale` may be traced, so changing it does not recompile.
  """

  def fn(tokens: jax.Array) -> jax.Array:
    return guide(cond_fn(tokens), uncond_fn(tokens), scale)

  return fn


def guide(cond: jax.Array, uncond: jax.Array, scale: jax.Array | float) -> jax.Array:
  """uncond + scale·(cond − uncond) in float32, for logits computed together."""
  cond, uncond = cond.astype(jnp.float32), uncond.astype(jnp.float32)
  return uncond + jnp.asarray(scale, jnp.float32) * (cond - uncond)


GUIDANCE_SCHEDULES = ("constant", "increasing", "decreasing")


def scheduled_guidance(scale: jax.Array | float, revealed: jax.Array,
                       schedule: str = "constant") -> jax.Array:
  """The guidance scale when a fraction `revealed` of the generated tokens is decided.

  'constant': `scale` throughout. 'increasing': from 1 (the plain conditional
  model) at the first step to `scale` at the last, as Muse ramps it: the
  first, scattered tokens are drawn from the calibrated model. 'decreasing':
  from `scale` down to 1: the text decides the first tokens, and the ones that
  fill in around them are drawn without the push towards object codes that
  guidance gives every position (at a constant 3 the shapes' objects grow into
  blobs). Linear in `revealed` ∈ [0, 1]. Neither ramp beat 'constant' on the
  built-in shapes (benchmarks/RESULTS.md).
  """
  scale = jnp.asarray(scale, jnp.float32)
  revealed = jnp.clip(jnp.asarray(revealed, jnp.float32), 0.0, 1.0)
  if schedule == "constant":
    return jnp.broadcast_to(scale, revealed.shape)
  if schedule == "increasing":
    return 1.0 + (scale - 1.0) * revealed
  if schedule == "decreasing":
    return scale + (1.0 - scale) * revealed
  raise ValueError(f"guidance schedule {schedule!r}: expected one of {GUIDANCE_SCHEDULES}")


def guide_with_memory(cond: jax.Array, uncond: jax.Array, cond_memory: jax.Array,
                      scale: jax.Array | float, memory_scale: jax.Array | float) -> jax.Array:
  """uncond + scale·(cond − uncond) + memory_scale·(cond_memory − cond), in float32.

  Two conditions with their own scales, nested as InstructPix2Pix nests image
  and text guidance: `cond` has the text, `cond_memory` the text and the
  long-term memory, `uncond` neither. memory_scale = 0 is plain CFG, 1 adds
  the memory at the strength of plain conditioning. Three passes are the
  fewest that keep the two scales independent.
  """
  cond_memory = cond_memory.astype(jnp.float32)
  return (guide(cond, uncond, scale)
          + jnp.asarray(memory_scale, jnp.float32) * (cond_memory - cond.astype(jnp.float32)))


def _top_k_filter(logits: jax.Array, k: int) -> jax.Array:
  kth = jax.lax.top_k(logits, k)[0][..., -1:]
  return jnp.where(logits < kth, -jnp.inf, logits)


def _lowest_ranks(confidence: jax.Array, count: jax.Array) -> jax.Array:
  """True at the `count[b]` smallest entries of each row, exactly (ties broken by index)."""
  rank = jnp.argsort(jnp.argsort(confidence, axis=-1, stable=True), axis=-1, stable=True)
  return rank < count[:, None]


def _check_num_steps(num_steps: jax.Array | int, max_steps: int) -> None:
  if isinstance(num_steps, jax.core.Tracer):
    return  # checked by clipping inside the loop instead
  n = int(num_steps)
  if not 1 <= n <= max_steps:
    raise ValueError(f"num_steps={n} must be in [1, max_steps={max_steps}]")


def decode(logits_fn: LogitsFn,
           rng: jax.Array,
           tokens: jax.Array,
           num_steps: jax.Array | int,
           *,
           mask_id: int,
           max_steps: int,
           temperature: jax.Array | float = 1.0,
           choice_temperature: jax.Array | float = 4.5,
           top_k: int | None = None,
           schedule: str = "cosine",
           record_tokens: bool = False,
           seam_prefix_frames: jax.Array | None = None,
           tokens_per_frame: int = 0) -> DecodeOutput:
  """Fills every [MASK] in `tokens` in `num_steps` parallel steps.

  Traceable: call it inside `jax.jit` (or use `decode_jit`); `num_steps`,
  `temperature` and `choice_temperature` may be traced, the keyword-only
  integers and strings must be static.

  Args:
    logits_fn: flat tokens (B, N) int32 -> logits (B, N, V) over the V real
      codes (no [MASK] entry, so [MASK] can never be sampled).
    rng: PRNG key; step s uses fold_in(rng, s), so a seed fixes the result. Or
      a key per example (shape (B,)): each example then draws from its own
      key only, so its result does not depend on the rest of the batch.
    tokens: int32 (B, N) start state; entries equal to `mask_id` are generated,
      all others are frozen and returned unchanged.
    num_steps: 1 ≤ num_steps ≤ max_steps (clipped into that range when traced).
    mask_id: the [MASK] token id (= codebook size).
    max_steps: static bound, sets the shape of the returned trace.
    temperature: > 0, divides the logits before sampling.
    choice_temperature: scale of the Gumbel noise added to the confidence,
      choice_temperature·(1 − (s + 1)/num_steps) at step s (MaskGIT's
      annealing; 0 at the last step, where every token is kept anyway): early
      steps explore which tokens to keep, late steps keep the most likely ones.
    top_k: if set, sample only among the k most likely codes.
    schedule: the mask schedule; see `mask_schedule.mask_ratio`.
    record_tokens: also return the tokens after every step.
    seam_prefix_frames: int32 (B,), seam blending (None: off, and the loop is
      exactly the plain one): the first k token frames of each example are a
      story's frozen prefix (given in `tokens`; k = 0: none). At every step
      a split j ~ U{1, …, k} is drawn per example (fold_in(step key, 2)):
      prefix frames before j are restored from the start tokens, the prefix
      frames from j on are [MASK]ed in the model's input and re-sampled,
      always kept (outside the schedule's count, which stays that of the
      generated tokens). So the seam is not one hard copy boundary: the
      generated frames are decided against a context that ends at a random
      frame, and the last step's split leaves the prefix frames after it
      re-generated to bridge the old context and the new frames. The first
      prefix frame is always kept (j ≥ 1).
    tokens_per_frame: static, positions per token frame (h·w) of the flat
      tokens; required with `seam_prefix_frames`.

  Returns:
    A `DecodeOutput`.
  """
  _check_num_steps(num_steps, max_steps)
  num_steps = jnp.clip(jnp.asarray(num_steps, jnp.int32), 1, max_steps)
  tokens = jnp.asarray(tokens, jnp.int32)
  batch, length = tokens.shape
  # The schedule counts from the tokens masked at the start, so frozen
  # prefixes of any size still end exactly at zero.
  initially_masked = jnp.sum(tokens == mask_id, axis=1, dtype=jnp.int32)
  blend = seam_prefix_frames is not None
  if blend:
    if tokens_per_frame <= 0 or length % tokens_per_frame:
      raise ValueError(f"seam blending needs tokens_per_frame (h·w) dividing {length}; got "
                       f"{tokens_per_frame}")
    prefix_values = tokens
    frame = (jnp.arange(length, dtype=jnp.int32) // tokens_per_frame)[None, :]
    prefix_frames = jnp.asarray(seam_prefix_frames, jnp.int32).reshape(batch, 1)
    in_prefix = frame < prefix_frames

  # One key per example (rng of shape (B,)): each example's draws are its key's
  # alone, so a sample does not depend on its batch or its place in it.
  per_example = rng.ndim == 1
  each = (lambda f, *xs: jax.vmap(f)(*xs)) if per_example else (lambda f, *xs: f(*xs))
  if per_example and rng.shape[0] != batch:
    raise ValueError(f"{rng.shape[0]} keys for a batch of {batch}")

  def body(step, state):
    tokens, mask_trace, token_trace, split_trace = state
    step_rng = each(lambda k: jax.random.fold_in(k, step), rng)
    if blend:
      split = each(lambda k, top: jax.random.randint(jax.random.fold_in(k, 2),
                                                     top.shape, 1, top + 1),
                   step_rng, jnp.maximum(prefix_frames, 1))
      kept = in_prefix & (frame < split)
      blended = in_prefix & ~kept
      tokens = jnp.where(kept, prefix_values, jnp.where(blended, mask_id, tokens))
      split_trace = split_trace.at[step].set(split[:, 0])
    unknown = tokens == mask_id
    logits = logits_fn(tokens).astype(jnp.float32) / temperature
    if top_k is not None:
      logits = _top_k_filter(logits, top_k)
    sample_rng, choice_rng = each(lambda k: tuple(jax.random.split(k)), step_rng)
    sampled = each(lambda k, x: jax.random.categorical(k, x, axis=-1), sample_rng,
                   logits).astype(jnp.int32)
    sampled = jnp.where(unknown, sampled, tokens)

    log_probs = jax.nn.log_softmax(logits, axis=-1)
    chosen = jnp.take_along_axis(log_probs, sampled[..., None], axis=-1)[..., 0]
    progress = (step + 1).astype(jnp.float32) / num_steps.astype(jnp.float32)
    noise_scale = choice_temperature * (1.0 - progress)
    gumbel = each(lambda k, x: jax.random.gumbel(k, x.shape), choice_rng, chosen)
    confidence = chosen + noise_scale * gumbel
    # Decided tokens are never re-masked.
    confidence = jnp.where(unknown, confidence, jnp.inf)
    if blend:  # re-sampled prefix frames are always kept, outside the count
      confidence = jnp.where(blended, jnp.inf, confidence)
      unknown = unknown & ~blended

    still_unknown = jnp.sum(unknown, axis=1, dtype=jnp.int32)
    target = mask_schedule.num_masked(step, num_steps, initially_masked, schedule)
    # Reveal at least one token per step, so a coarse schedule on few tokens
    # still makes progress; the last step's target of 0 reveals the rest.
    target = jnp.maximum(jnp.minimum(target, still_unknown - 1), 0)
    remask = _lowest_ranks(confidence, target)
    tokens = jnp.where(remask, mask_id, sampled)

    mask_trace = mask_trace.at[step].set(jnp.sum(tokens == mask_id, axis=1, dtype=jnp.int32))
    if token_trace is not None:
      token_trace = token_trace.at[step].set(tokens)
    return tokens, mask_trace, token_trace, split_trace

  mask_trace = jnp.full((max_steps, batch), -1, jnp.int32)
  token_trace = jnp.full((max_steps, batch, length), -1, jnp.int32) if record_tokens else None
  split_trace = jnp.full((max_steps, batch), -1, jnp.int32) if blend else None
  tokens, mask_trace, token_trace, split_trace = jax.lax.fori_loop(
      0, num_steps, body, (tokens, mask_trace, token_trace, split_trace))
  return DecodeOutput(tokens, mask_trace, token_trace, split_trace)


_STATIC = ("logits_fn", "mask_id", "max_steps", "top_k", "schedule", "record_tokens",
           "tokens_per_frame")
_decode_compiled = jax.jit(decode, static_argnames=_STATIC)


def decode_jit(logits_fn: LogitsFn,
               rng: jax.Array,
               tokens: jax.Array,
               num_steps: jax.Array | int,
               *,
               mask_id: int,
               max_steps: int,
               temperature: jax.Array | float = 1.0,
               choice_temperature: jax.Array | float = 4.5,
               top_k: int | None = None,
               schedule: str = "cosine",
               record_tokens: bool = False,
               seam_prefix_frames: jax.Array | None = None,
               tokens_per_frame: int = 0) -> DecodeOutput:
  """`decode`, compiled once per `logits_fn` and static settings.

  The traced scalars are always passed as int32 / float32 arrays, so a Python
  int or a jnp scalar, or a changed temperature, reuses the compilation.
  `logits_fn` is static (hashed by identity): pass the same function object.
  A logits_fn that closes over parameters should instead be built, and
  `decode` called, inside the caller's own jit (see the module docstring).
  """
  _check_num_steps(num_steps, max_steps)
  return _decode_compiled(
      logits_fn, rng, tokens, jnp.asarray(num_steps, jnp.int32), mask_id=mask_id,
      max_steps=max_steps, temperature=jnp.asarray(temperature, jnp.float32),
      choice_temperature=jnp.asarray(choice_temperature, jnp.float32), top_k=top_k,
      schedule=schedule, record_tokens=record_tokens,
      seam_prefix_frames=(None if seam_prefix_frames is None
                          else jnp.asarray(seam_prefix_frames, jnp.int32)),
      tokens_per_frame=tokens_per_frame)
