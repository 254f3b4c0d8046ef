"""The MaskGIT generator of Phenaki: a bidirectional transformer over video tokens.

Input is a grid of C-ViViT codes (B, T, h, w) in which some entries are the
[MASK] id (= codebook_size); output is, for every position, logits over the
codebook_size real codes. Every token attends to every other token (no
causality: the tokenizer is causal, the generator is not) and, through
cross-attention in each block, to the text embeddings.

Choices:
  * Positions are learned and factorised, token frame + row + column, so the
    model knows the 3D layout with T + h + w tables instead of T·h·w, and one
    model serves any clip up to `max_token_frames`.
  * One learned "null" text token is always visible in cross-attention. With
    an all-False text mask (dropped text) a softmax over no keys has no
    meaning; with the null token it is well defined, and that very input is
    the unconditional model that classifier-free guidance needs.
  * Optional long-term memory (`memory_token_frames` > 0; off by default, and
    then no parameter of it exists): a story's first token frames join the
    text context with their own mask (phenaki_jax/models/memory.py).
  * Output logits are NOT tied to the token embedding: the embedding has an
    extra [MASK] row that is never a target, and untied heads let the 'vocab'
    axis of the input and output tables be sharded independently. The cost is
    codebook_size·width parameters.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from phenaki_jax.models.layers import DenseGeneral, Transformer, TransformerSpec, constrain
from phenaki_jax.models.memory import MemoryContext

Dtype = Any

_embed_init = nn.initializers.normal(stddev=0.02)
_EMBED_ROW_MULTIPLE = 128


class MaskGitTransformer(nn.Module):
  """Bidirectional text-conditioned transformer over (B, T, h, w) video tokens.

  Attributes:
    codebook_size: number of real codes V; the [MASK] id is V.
    max_token_frames: largest T accepted (size of the frame position table).
    grid_height: largest h accepted (row position table).
    grid_width: largest w accepted (column position table).
    spec: the transformer stack (layers.TransformerSpec): width of the residual
      stream, spec.depth blocks each with self- and cross-attention, heads,
      MLP width, remat, scan, dtypes (compute and parameter; logits are
      returned in float32) and the attention implementation.
    memory_token_frames: token frames of long-term memory in the cross-attention
      context; 0: none (and no memory parameters).
  """
  codebook_size: int
  max_token_frames: int
  grid_height: int
  grid_width: int
  spec: TransformerSpec
  memory_token_frames: int = 0

  @property
  def width(self) -> int:
    return self.spec.width

  @property
  def dtype(self) -> Dtype:
    return self.spec.dtype

  @property
  def param_dtype(self) -> Dtype:
    return self.spec.param_dtype

  @property
  def mask_id(self) -> int:
    return self.codebook_size

  @property
  def embedding_rows(self) -> int:
    """codebook_size codes + [MASK], padded up to a multiple of 128.

    8192 + 1 rows could not be split over any mesh axis; the padding rows are
    never looked up.
    """
    return -(-(self.codebook_size + 1) // _EMBED_ROW_MULTIPLE) * _EMBED_ROW_MULTIPLE

  def _table(self, name: str, rows: int, axes: tuple[str, str]) -> jax.Array:
    return self.param(name, nn.with_logical_partitioning(_embed_init, axes),
                      (rows, self.width), self.param_dtype)

  def _check(self, tokens: jax.Array, text: jax.Array, text_mask: jax.Array) -> None:
    if tokens.ndim != 4:
      raise ValueError(f"tokens must be (batch, token_frames, h, w); got {tokens.shape}")
    _, t, h, w = tokens.shape
    if t > self.max_token_frames or h > self.grid_height or w > self.grid_width:
      raise ValueError(
          f"tokens {tokens.shape[1:]} exceed this model's (max_token_frames, grid_height, "
          f"grid_width) = {(self.max_token_frames, self.grid_height, self.grid_width)}")
    if text.ndim != 3 or text_mask.shape != text.shape[:2]:
      raise ValueError(f"text must be (batch, length, dim) with a (batch, length) mask; got "
                       f"{text.shape} and {text_mask.shape}")

  def _embed_text(self, text: jax.Array, text_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Text (B, L, D_text) -> context (B, 1 + L, width) led by the null token, mask (B, 1 + L)."""
    batch = text.shape[0]
    # 'text_embed' is not in the shared rules, so by default the text width of
    # this small kernel is replicated while its output side follows 'embed'.
    ctx = DenseGeneral(self.width, kernel_axes=("text_embed", "embed"), dtype=self.dtype,
                       param_dtype=self.param_dtype, name="text_projection")(text)
    null = self.param("null_text", nn.with_logical_partitioning(_embed_init, ("embed",)),
                      (self.width,), self.param_dtype)
    null = jnp.broadcast_to(jnp.asarray(null, self.dtype), (batch, 1, self.width))
    # Both halves laid out alike, so the concatenation needs no resharding.
    act = ("act_batch", "act_len", "act_embed")
    ctx = jnp.concatenate([constrain(null, *act), constrain(ctx.astype(self.dtype), *act)], axis=1)
    mask = jnp.concatenate([jnp.ones((batch, 1), jnp.bool_), text_mask.astype(jnp.bool_)], axis=1)
    return constrain(ctx, *act), mask

  @nn.compact
  def __call__(self, tokens: jax.Array, text: jax.Array, text_mask: jax.Array,
               memory: jax.Array | None = None,
               memory_mask: jax.Array | None = None) -> jax.Array:
    """Logits over the codes for every position.

    Args:
      tokens: int32 (B, T, h, w), entries in [0, codebook_size]; codebook_size
        is [MASK].
      text: (B, L, D_text) text embeddings (e.g. T5 outputs).
      text_mask: bool (B, L), True for real text tokens; all False = no text.
      memory: int32 (B, memory_token_frames, h, w) long-term memory tokens, or
        None (no memory); only for a model with memory_token_frames > 0.
      memory_mask: bool (B,): True where an example's memory is given; None:
        all True (when `memory` is given).

    Returns:
      float32 logits (B, T, h, w, codebook_size).
    """
    self._check(tokens, text, text_mask)
    batch, t, h, w = tokens.shape
    table = self._table("token_embedding", self.embedding_rows, ("vocab", "embed"))
    # Gather from a table whole along 'embed' (as FSDP gathers any weight before
    # use): a lookup into an embed-sharded table would come out sharded by the
    # wrong dimension and XLA would replicate it to reshard by batch.
    table = nn.with_logical_constraint(jnp.asarray(table, self.dtype), ("vocab", None))
    x = jnp.take(table, tokens.astype(jnp.int32), axis=0)
    frame_pos = self._table("frame_pos", self.max_token_frames, ("frames", "embed"))
    row_pos = self._table("row_pos", self.grid_height, ("grid", "embed"))
    col_pos = self._table("col_pos", self.grid_width, ("grid", "embed"))
    pos = (frame_pos[:t, None, None] + row_pos[None, :h, None] + col_pos[None, None, :w])
    x = (x + jnp.asarray(pos, self.dtype)).reshape(batch, t * h * w, self.width)
    x = constrain(x, "act_batch", "act_len", "act_embed")

    context, context_mask = self._embed_text(text, text_mask)
    if self.memory_token_frames:  # phenaki_jax/models/memory.py
      if memory is None:  # none given: the same parameters and shapes, all masked
        memory = jnp.full((batch, self.memory_token_frames, h, w), self.mask_id, jnp.int32)
        memory_mask = jnp.zeros((batch,), jnp.bool_)
      elif memory_mask is None:
        memory_mask = jnp.ones((batch,), jnp.bool_)
      mem, mem_mask = MemoryContext(self.memory_token_frames, self.width, dtype=self.dtype,
                                    param_dtype=self.param_dtype, name="memory")(
                                        table, row_pos[:h], col_pos[:w], memory, memory_mask)
      context = constrain(jnp.concatenate([context, mem], axis=1),
                          "act_batch", "act_len", "act_embed")
      context_mask = jnp.concatenate([context_mask, mem_mask], axis=1)
    elif memory is not None:
      raise ValueError("memory given, but this generator has memory_token_frames=0")
    x = Transformer(self.spec, causal=False, cross_attention=True, name="transformer")(
        x, context, context_mask)

    logits = DenseGeneral(self.codebook_size, kernel_axes=("embed", "vocab"), dtype=self.dtype,
                          param_dtype=self.param_dtype, name="to_logits")(x)
    logits = constrain(logits.astype(jnp.float32), "act_batch", "act_len", "act_vocab")
    return logits.reshape(batch, t, h, w, self.codebook_size)


def from_config(model_config: Any, *, codebook_size: int, max_token_frames: int,
                grid_size: int | tuple[int, int]) -> MaskGitTransformer:
  """Builds a MaskGitTransformer from a `config.model` ConfigDict.

  The stack comes from TransformerSpec.from_config (width, num_heads, head_dim,
  mlp_dim, remat, remat_policy, scan_layers, dtype, param_dtype,
  attention_impl) with depth num_layers; memory_token_frames from the section;
  the token-grid sizes from the tokenizer (its codebook size,
  image_size // patch_size, and the clip length).
  """
  m = model_config
  grid_h, grid_w = (grid_size, grid_size) if isinstance(grid_size, int) else tuple(grid_size)
  return MaskGitTransformer(
      codebook_size=codebook_size,
      max_token_frames=max_token_frames,
      grid_height=grid_h,
      grid_width=grid_w,
      spec=TransformerSpec.from_config(m, depth=m.num_layers),
      memory_token_frames=m.get("memory_token_frames", 0),
  )
