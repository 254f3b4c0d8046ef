"""The MaskGIT objective: masking, the story prefix and long-term memory tasks, the loss.

One example's tokens are padded to the token grid (an image is its first
token frame), a fraction γ(r) of them with r ~ U(0, 1) is masked, the text of
`text_drop_rate` of the examples is dropped (classifier-free guidance), and
the cross-entropy is taken on the masked tokens only.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from phenaki_jax.data import pipeline
from phenaki_jax.models import cvivit, maskgit
from phenaki_jax.sampling import mask_schedule
from phenaki_jax.text.encoder import TextEncoder, encode_text

# Masking-progress buckets for metrics: r in [0, .25), ..., [.75, 1]; small r
# masks almost everything (the first decoding steps), large r almost nothing.
R_BUCKETS = ("00-25", "25-50", "50-75", "75-100")
_BUCKET_STATS = "bucket_stats"


def split_step_rng(rng: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(mask rng, text-drop rng) of a step."""
  mask_rng, drop_rng = jax.random.split(rng)
  return mask_rng, drop_rng


def sample_prefix_frames(rng: jax.Array, real_frames: jax.Array,
                         probability: float | jax.Array) -> jax.Array:
  """int32 (B,): token frames given unmasked as a story's context; 0 for most examples.

  With `probability` an example with t ≥ 2 real token frames gets a prefix of
  k ~ U{1, …, t−1} frames (never all of them, so something is left to learn).
  """
  use_rng, k_rng = jax.random.split(rng)
  real = real_frames.astype(jnp.int32)
  use = jax.random.bernoulli(use_rng, probability, real.shape) & (real >= 2)
  k = jax.random.randint(k_rng, real.shape, 1, jnp.maximum(real, 2))
  return jnp.where(use, k, 0)


def corrupt_prefix(rng: jax.Array, tokens: jax.Array, prefix_frames: jax.Array,
                   fraction: float, codebook_size: int) -> jax.Array:
  """Replaces `fraction` of the prefix tokens by random codes, so the model
  learns to continue a context it cannot trust blindly (re-encoded frames are
  not the tokens it sampled)."""
  b = tokens.shape[0]
  frame = jax.lax.broadcasted_iota(jnp.int32, tokens.shape, 1)
  in_prefix = frame < prefix_frames.reshape((b,) + (1,) * (tokens.ndim - 1))
  flip_rng, code_rng = jax.random.split(rng)
  flip = in_prefix & jax.random.bernoulli(flip_rng, fraction, tokens.shape)
  random_codes = jax.random.randint(code_rng, tokens.shape, 0, codebook_size)
  return jnp.where(flip, random_codes, tokens)


def text_drop_mask(rng: jax.Array, batch_size: int, rate: float | jax.Array) -> jax.Array:
  """bool (B,): True for the examples whose text is replaced by the empty text."""
  return jax.random.bernoulli(rng, rate, (batch_size,))


def pad_token_grid(codes: jax.Array, num_token_frames: int, mask_id: int,
                   token_frames: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Codes (B, t, h, w) -> tokens (B, T, h, w) and the bool region of real tokens.

  An image is a clip of one token frame: the other token frames are [MASK]
  inputs outside the loss region, so it trains on its first-frame tokens only
  (and the model sees it as the first frame of a clip yet to be generated).
  `token_frames` (B,) marks fewer real frames per example, for mixed batches.
  """
  b, t = codes.shape[:2]
  if t > num_token_frames:
    raise ValueError(f"codes have {t} token frames; the generator takes at most "
                     f"{num_token_frames} (config.model.token_grid)")
  tokens = jnp.pad(codes.astype(jnp.int32), ((0, 0), (0, num_token_frames - t), (0, 0), (0, 0)),
                   constant_values=mask_id)
  real = jnp.full((b,), t, jnp.int32)
  if token_frames is not None:
    real = jnp.minimum(token_frames.astype(jnp.int32), t)
  region = jnp.arange(num_token_frames)[None, :] < real[:, None]
  region = jnp.broadcast_to(region[:, :, None, None], tokens.shape)
  return jnp.where(region, tokens, mask_id), region


def token_cross_entropy(logits: jax.Array, targets: jax.Array,
                        label_smoothing: float) -> tuple[jax.Array, jax.Array]:
  """Per-position (cross-entropy, correct) for float32 logits (..., V).

  A one-hot product rather than a gather, so a vocab-sharded logits array
  reduces across its shards without being gathered.
  """
  vocab = logits.shape[-1]
  lse = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.sum(logits * jax.nn.one_hot(targets, vocab, dtype=logits.dtype), axis=-1)
  ce = lse - target_logit
  if label_smoothing > 0:
    # Smoothed labels (1-ε)·onehot + ε/V give (1-ε)·CE + ε·(lse - mean logit).
    ce = (1.0 - label_smoothing) * ce + label_smoothing * (lse - jnp.mean(logits, axis=-1))
  return ce, jnp.argmax(logits, axis=-1) == targets


def _progress_from_ratio(ratio: jax.Array, schedule: str) -> jax.Array:
  """The r whose γ(r) is `ratio` (inverse of mask_schedule.mask_ratio)."""
  ratio = jnp.clip(ratio, 0.0, 1.0)
  if schedule == "cosine":
    return jnp.arccos(ratio) * (2.0 / math.pi)
  if schedule == "linear":
    return 1.0 - ratio
  return jnp.sqrt(1.0 - ratio)  # square


def bucket_stats(ce: jax.Array, correct: jax.Array, masked: jax.Array, maskable: jax.Array,
                 schedule: str) -> dict[str, jax.Array]:
  """Sums of loss / correct / count over masked tokens, per bucket of r.

  An example's r comes from its masked share of `maskable`: the tokens the
  mask was drawn from (real tokens outside its prefix and own memory frames).

  Sums (not means): a bucket can be empty in a step; the host divides after
  summing a whole log interval (finish_bucket_metrics).
  """
  b = masked.shape[0]
  weight = masked.reshape(b, -1).astype(jnp.float32)
  eligible = maskable.reshape(b, -1).sum(axis=1)
  r = _progress_from_ratio(weight.sum(axis=1) / jnp.maximum(eligible, 1), schedule)
  bucket = jnp.clip(jnp.floor(r * len(R_BUCKETS)), 0, len(R_BUCKETS) - 1).astype(jnp.int32)
  ce, correct = ce.reshape(b, -1), correct.reshape(b, -1).astype(jnp.float32)
  out = {}
  for k, name in enumerate(R_BUCKETS):
    w = weight * (bucket == k)[:, None]
    out[f"{_BUCKET_STATS}/{name}/loss_sum"] = jnp.sum(ce * w)
    out[f"{_BUCKET_STATS}/{name}/correct_sum"] = jnp.sum(correct * w)
    out[f"{_BUCKET_STATS}/{name}/count"] = jnp.sum(w)
  return out


def finish_bucket_metrics(scalars: dict[str, float]) -> dict[str, float]:
  """Turns interval sums into train/by_r/BUCKET/{loss,masked_accuracy}."""
  for name in R_BUCKETS:
    prefix = f"{_BUCKET_STATS}/{name}/"
    loss_sum, correct_sum, count = (scalars.pop(prefix + k)
                                    for k in ("loss_sum", "correct_sum", "count"))
    if count > 0:
      scalars[f"train/by_r/{name}/loss"] = loss_sum / count
      scalars[f"train/by_r/{name}/masked_accuracy"] = correct_sum / count
  return scalars


def training_inputs(rng: jax.Array, tokens: jax.Array, region: jax.Array, *, schedule: str,
                    mask_id: int, codebook_size: int, prefix_probability: float = 0.0,
                    prefix_corrupt_fraction: float = 0.0,
                    given_prefix: jax.Array | None = None,
                    memory_frames: jax.Array | None = None
                    ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(model inputs, bool masked = loss weight, prefix token frames (B,)) of a step.

  Masks γ(r) of each example's maskable tokens (in `region`, outside its
  story prefix); the prefix is given as context (corrupted when asked). A
  story clip's own context (`given_prefix` token frames, > 0) is its prefix.
  `memory_frames` (B,): an example's first token frames that are its own
  long-term memory; those not in its prefix are [MASK] in the input and
  outside the loss (see memory_inputs).
  """
  mask_rng, _ = split_step_rng(rng)
  # Its own stream (fold_in): the mask and text-drop draws stay as they were.
  prefix_rng, corrupt_rng = jax.random.split(jax.random.fold_in(rng, 2))
  prefix_frames = jnp.zeros((tokens.shape[0],), jnp.int32)
  if prefix_probability > 0:
    prefix_frames = sample_prefix_frames(prefix_rng, region[:, :, 0, 0].sum(axis=1),
                                         prefix_probability)
  if given_prefix is not None:
    prefix_frames = jnp.where(given_prefix > 0, given_prefix.astype(jnp.int32), prefix_frames)
  frozen = prefix_frames if memory_frames is None else jnp.maximum(prefix_frames, memory_frames)
  masked = mask_schedule.sample_mask(mask_rng, tokens.shape, schedule, loss_region=region,
                                     num_frozen_frames=frozen)
  context = tokens
  if prefix_corrupt_fraction > 0 and (prefix_probability > 0 or given_prefix is not None):
    context = corrupt_prefix(corrupt_rng, tokens, prefix_frames, prefix_corrupt_fraction,
                             codebook_size)
  inputs = jnp.where(masked, mask_id, context)
  if memory_frames is not None:
    frame = jax.lax.broadcasted_iota(jnp.int32, tokens.shape, 1)
    per_example = lambda x: x.reshape((-1,) + (1,) * (tokens.ndim - 1))
    hidden = (frame >= per_example(prefix_frames)) & (frame < per_example(memory_frames))
    inputs = jnp.where(hidden, mask_id, inputs)
  return inputs, masked, prefix_frames


def compute_losses(generator: maskgit.MaskGitTransformer, text: TextEncoder, params: Any,
                   frozen_text_params: Any, batch: Mapping[str, jax.Array], codes: jax.Array,
                   rng: jax.Array, *, text_drop_rate: float | jax.Array, label_smoothing: float,
                   schedule: str, prefix_probability: float = 0.0,
                   prefix_corrupt_fraction: float = 0.0,
                   memory_drop_rate: float | jax.Array = 1.0
                   ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Masked-token cross-entropy and its logged parts.

  With `prefix_probability`, an example's first k token frames are given
  unmasked (a story's re-encoded context) and the loss is on the rest; a
  `prefix_corrupt_fraction` of those context tokens is replaced at random.
  A generator with memory gets memory tokens (batch['memory_codes'], else
  the clip's own; see memory_inputs), dropped at
  `memory_drop_rate` (the default 1 gives none, as the held-out eval has it).
  Parts under 'bucket_stats/' are interval sums, not metrics (see
  finish_bucket_metrics).
  """
  tokens, region = pad_token_grid(codes, generator.max_token_frames, generator.mask_id,
                                  batch.get("token_frames"))
  _, drop_rng = split_step_rng(rng)
  memory, memory_present, own_memory = None, None, None
  if generator.memory_token_frames:
    # Its own stream (fold_in), as the prefix's: the other draws stay as they were.
    memory, memory_present, own_memory = memory_inputs(
        jax.random.fold_in(rng, 3), tokens, region,
        memory_token_frames=generator.memory_token_frames, drop_rate=memory_drop_rate,
        given=batch.get("memory_codes"))
  inputs, masked, prefix_frames = training_inputs(
      rng, tokens, region, schedule=schedule, mask_id=generator.mask_id,
      codebook_size=generator.codebook_size, prefix_probability=prefix_probability,
      prefix_corrupt_fraction=prefix_corrupt_fraction,
      given_prefix=batch.get("prefix_token_frames"), memory_frames=own_memory)
  context, context_mask = encode_text(text, params, frozen_text_params, batch)
  dropped = text_drop_mask(drop_rng, tokens.shape[0], text_drop_rate)
  # All-False: the generator attends to its learned null token only.
  context_mask = context_mask & ~dropped[:, None]
  memory_args = () if memory is None else (memory, memory_present)
  logits = generator.apply({"params": params["generator"]}, inputs, context, context_mask,
                           *memory_args)
  # Padding positions hold [MASK] (= V, not a class); they carry no weight.
  targets = jnp.where(region, tokens, 0)
  ce, correct = token_cross_entropy(logits, targets, label_smoothing)
  weight = masked.astype(jnp.float32)
  count = jnp.maximum(jnp.sum(weight), 1.0)
  loss = jnp.sum(ce * weight) / count
  b = tokens.shape[0]
  # Of the tokens the mask could take: the given prefix and own memory frames are context.
  frozen = prefix_frames if own_memory is None else jnp.maximum(prefix_frames, own_memory)
  maskable = region & (jax.lax.broadcasted_iota(jnp.int32, tokens.shape, 1)
                       >= frozen.reshape((b,) + (1,) * (tokens.ndim - 1)))
  ratio = weight.reshape(b, -1).sum(1) / jnp.maximum(maskable.reshape(b, -1).sum(1), 1)
  parts = {
      "train/loss": loss,
      "train/masked_accuracy": jnp.sum(correct * weight) / count,
      "train/mask_ratio": jnp.mean(ratio),
      "train/text_dropped_fraction": jnp.mean(dropped.astype(jnp.float32)),
      "train/prefix_fraction": jnp.mean((prefix_frames > 0).astype(jnp.float32)),
  }
  if memory is not None:
    parts["train/memory_fraction"] = jnp.mean(memory_present.astype(jnp.float32))
  parts.update(bucket_stats(ce, correct, masked, maskable, schedule))
  return loss, parts


def batch_codes(tokenizer_model: cvivit.CViViT, tokenizer_params: Any,
                batch: Mapping[str, jax.Array]) -> jax.Array:
  """Precomputed batch['codes'], else the frozen tokenizer's codes of batch['frames']."""
  if "codes" in batch:
    return batch["codes"].astype(jnp.int32)
  video = pipeline.to_model_input(batch["frames"])
  _, aux = tokenizer_model.apply({"params": tokenizer_params}, video,
                                 method=tokenizer_model.encode)
  return jax.lax.stop_gradient(aux["codes"]).astype(jnp.int32)


# --- Long-term memory in training (model.memory_token_frames > 0).
# A story's later windows get the first token frame(s) of its first window as
# extra cross-attention context (phenaki_jax/models/maskgit.py). Training must
# give the model such a memory without letting it copy the memory into what
# the loss asks for, and drop it often enough that guidance can contrast the
# model with and without it (phenaki_jax/sampling/parallel_decode.py
# guide_with_memory).

def memory_inputs(rng: jax.Array, tokens: jax.Array, region: jax.Array, *,
                  memory_token_frames: int, drop_rate: float | jax.Array,
                  given: jax.Array | None = None
                  ) -> tuple[jax.Array, jax.Array, jax.Array | None]:
  """(memory tokens (B, m, h, w), bool present (B,), own memory frames (B,) or None).

  Where the memory comes from, and why it cannot be copied into the answer:
    * `given` (story clips of the built-in data): the codes of frames of
      the clip's object rendered apart from the clip (its own place and
      motion), as a story's first window is to its much later ones: the same
      look, an unrelated place. Never part of the clip, so nothing to leak;
      every such example is eligible.
    * otherwise (plain clips, real or pre-tokenised data): the clip's own
      first m token frames. Those frames then leave the loss and, unless the
      prefix task already gives them, are [MASK] in the input (the third
      result tells training_inputs which): the model is never rewarded for
      copying the memory into the positions it came from, only for using it
      to make the frames after it (a first frame it is told, as a story's
      opening is told). Only examples with more than m real token frames are
      eligible (an image would keep nothing to learn).
  Eligible examples keep their memory with probability 1 − drop_rate (drawn
  per example and step); a dropped or absent memory has an all-False mask,
  which trains the memory-free model that memory guidance needs.
  """
  m = memory_token_frames
  b = tokens.shape[0]
  keep = ~jax.random.bernoulli(rng, drop_rate, (b,))
  if given is not None:
    return given.astype(jnp.int32), keep, None
  present = keep & (region[:, :, 0, 0].sum(axis=1) > m)
  return tokens[:, :m], present, jnp.where(present, m, 0).astype(jnp.int32)
