"""Long-term memory in the generator's training (model.memory_token_frames > 0).

A story's later windows get the first token frame(s) of its first window as
extra cross-attention context (phenaki_jax/models/maskgit.py). Training must
give the model such a memory without letting it copy the memory into what
the loss asks for, and drop it often enough that guidance can contrast the
model with and without it (phenaki_jax/sampling/parallel_decode.py
guide_with_memory).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


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
