"""Long-term memory of a story as cross-attention context (StreamingT2V's
appearance preservation, in token form).

A story's later windows drift: each re-encodes the previous one's last
frames, and small errors add up until the object changes colour or shape.
The memory is a few token frames from the story's start (its first window's
first token frame). They are embedded like the video tokens — the same token
table and row/column positions, so the memory's layout lines up with the
grid — plus a learned table of memory frames that also marks them as memory,
then normalised (token embeddings start at stddev 0.02; the projected text
next to them is on a unit scale). The generator appends them to the text
context with their own mask, so the memory can be dropped in training and
guided on its own scale in sampling.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from phenaki_jax.models.layers import LayerNorm, constrain

Dtype = Any

_embed_init = nn.initializers.normal(stddev=0.02)


class MemoryContext(nn.Module):
  """Memory tokens (B, m, h, w) -> context (B, m·h·w, width) and its mask (B, m·h·w).

  Attributes:
    num_frames: m, token frames of memory.
    width: width of the generator's residual stream (and of its context).
    dtype: compute dtype.
    param_dtype: dtype the parameters are created in.
  """
  num_frames: int
  width: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, table: jax.Array, row_pos: jax.Array, col_pos: jax.Array,
               memory: jax.Array, memory_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Embeds the memory with the generator's own tables.

    Args:
      table: the generator's token embedding (rows, width).
      row_pos: its row positions (h, width) for this grid.
      col_pos: its column positions (w, width) for this grid.
      memory: int32 (B, m, h, w) codes.
      memory_mask: bool (B,): True where an example's memory is given.
    """
    batch, m, h, w = memory.shape
    if (m, h, w) != (self.num_frames, row_pos.shape[0], col_pos.shape[0]):
      raise ValueError(f"memory must be (batch, memory_token_frames, h, w) = "
                       f"{(batch, self.num_frames, row_pos.shape[0], col_pos.shape[0])}; "
                       f"got {memory.shape}")
    frame_pos = self.param("frame_pos", nn.with_logical_partitioning(
        _embed_init, ("frames", "embed")), (m, self.width), self.param_dtype)
    pos = frame_pos[:, None, None] + row_pos[None, :, None] + col_pos[None, None, :]
    x = jnp.take(table, memory.astype(jnp.int32), axis=0) + jnp.asarray(pos, self.dtype)
    x = LayerNorm(name="norm", dtype=self.dtype, param_dtype=self.param_dtype)(
        x.reshape(batch, m * h * w, self.width))
    mask = jnp.broadcast_to(memory_mask.astype(jnp.bool_).reshape(batch, 1), (batch, m * h * w))
    return constrain(x, "act_batch", "act_len", "act_embed"), mask
