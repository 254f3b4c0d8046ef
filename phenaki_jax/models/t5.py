"""T5 v1.1 text encoder in Linen (the frozen text conditioner of Phenaki).

The parameter tree mirrors the T5X encoder (`token_embedder/embedding`,
`relpos_bias/rel_embedding`, `layers_{i}/attention/query/kernel`, ...), so T5X
checkpoints map almost one to one and Hugging Face checkpoints need only
transposes and reshapes (see `t5_weights.py`). Attention kernels are stored as
(embed, heads, kv) / (heads, kv, embed) rather than T5X's flattened 2D kernels
so that 'heads' and 'kv' are shardable logical axes of their own.

Numerics follow Hugging Face `T5EncoderModel` (which matches T5X):
  * no 1/sqrt(d_kv) scaling of attention logits (T5 folds it into the init);
  * RMS norm without mean subtraction or bias, computed in float32;
  * gated GELU MLP with the tanh approximation ("gelu_new");
  * one relative position bias, bidirectional buckets, shared by all layers;
  * padded keys masked with a large negative bias; padded queries still produce
    (meaningless) outputs, exactly as in T5, so callers must use the mask.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from phenaki_jax.models import layers

Array = jax.Array
DType = Any

PAD_ID = 0
EOS_ID = 1
UNK_ID = 2

# Large but finite, so a row whose keys are all padding gives a uniform softmax
# instead of NaNs.
_MASK_BIAS = -1e10


@dataclasses.dataclass(frozen=True)
class T5EncoderConfig:
  """Sizes of a T5 encoder; `make_module` turns them into a `T5Encoder`."""
  vocab_size: int = 32128
  d_model: int = 512
  d_kv: int = 64
  d_ff: int = 1024
  num_heads: int = 6
  num_layers: int = 8
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6
  dropout_rate: float = 0.0

  def make_module(self, dtype: DType = jnp.float32,
                  param_dtype: DType = jnp.float32) -> 'T5Encoder':
    return T5Encoder(
        vocab_size=self.vocab_size,
        d_model=self.d_model,
        d_kv=self.d_kv,
        d_ff=self.d_ff,
        num_heads=self.num_heads,
        num_layers=self.num_layers,
        relative_attention_num_buckets=self.relative_attention_num_buckets,
        relative_attention_max_distance=self.relative_attention_max_distance,
        layer_norm_epsilon=self.layer_norm_epsilon,
        dropout_rate=self.dropout_rate,
        dtype=dtype,
        param_dtype=param_dtype)


# T5 v1.1 sizes (t5x `t5_1_1/*.gin`, HF `google/t5-v1_1-*` config.json).
T5_V1_1_SMALL = T5EncoderConfig(
    d_model=512, d_kv=64, d_ff=1024, num_heads=6, num_layers=8)
T5_V1_1_BASE = T5EncoderConfig(
    d_model=768, d_kv=64, d_ff=2048, num_heads=12, num_layers=12)
T5_V1_1_LARGE = T5EncoderConfig(
    d_model=1024, d_kv=64, d_ff=2816, num_heads=16, num_layers=24)
T5_V1_1_XL = T5EncoderConfig(
    d_model=2048, d_kv=64, d_ff=5120, num_heads=32, num_layers=24)
T5_V1_1_XXL = T5EncoderConfig(
    d_model=4096, d_kv=64, d_ff=10240, num_heads=64, num_layers=24)
# A small randomly initialised byte-level encoder: the default when no
# pretrained T5 is available offline. Ids are ByT5's (byte + 3, pad 0, eos 1,
# unk 2); the vocabulary is padded to 384 as in ByT5's own configs so that the
# same tokenizer also drives real ByT5 checkpoints.
BYT5_TINY = T5EncoderConfig(
    vocab_size=384, d_model=128, d_kv=32, d_ff=256, num_heads=4, num_layers=2)

PRESETS = {
    't5_v1_1_small': T5_V1_1_SMALL,
    't5_v1_1_base': T5_V1_1_BASE,
    't5_v1_1_large': T5_V1_1_LARGE,
    't5_v1_1_xl': T5_V1_1_XL,
    't5_v1_1_xxl': T5_V1_1_XXL,
    'byt5_tiny': BYT5_TINY,
}


def get_config(name: str) -> T5EncoderConfig:
  if name not in PRESETS:
    raise ValueError(f'Unknown T5 preset {name!r}; known: {sorted(PRESETS)}')
  return PRESETS[name]


def relative_position_buckets(query_length: int, key_length: int,
                              num_buckets: int, max_distance: int,
                              bidirectional: bool = True) -> np.ndarray:
  """T5 relative position buckets, shape (query_length, key_length), int32.

  Lengths are static, so this is plain numpy evaluated at trace time. The log
  is taken in float32 like the reference implementations, so bucket edges land
  on exactly the same distances (checked against HF for |d| <= 2048).

  Args:
    query_length: number of query positions.
    key_length: number of key positions.
    num_buckets: total buckets (split in two halves when bidirectional).
    max_distance: distances at or beyond this share the last bucket.
    bidirectional: whether keys after the query get their own buckets.

  Returns:
    int32 array of bucket ids in [0, num_buckets).
  """
  relative = (np.arange(key_length, dtype=np.int64)[None, :] -
              np.arange(query_length, dtype=np.int64)[:, None])
  buckets = np.zeros_like(relative)
  if bidirectional:
    num_buckets //= 2
    buckets += (relative > 0).astype(np.int64) * num_buckets
    distance = np.abs(relative)
  else:
    distance = np.maximum(-relative, 0)
  max_exact = num_buckets // 2
  is_small = distance < max_exact
  with np.errstate(divide='ignore'):
    scaled = (np.log(distance.astype(np.float32) / np.float32(max_exact)) /
              np.float32(math.log(max_distance / max_exact)) *
              np.float32(num_buckets - max_exact))
  # Distance 0 gives -inf here; it is always in the exact range, but keep the
  # cast well defined.
  scaled = np.where(is_small, 0.0, scaled)
  if_large = np.minimum(max_exact + scaled.astype(np.int64), num_buckets - 1)
  buckets += np.where(is_small, distance, if_large)
  return buckets.astype(np.int32)


class T5LayerNorm(nn.Module):
  """RMS norm: scale only, no mean subtraction, no bias, computed in float32."""
  epsilon: float = 1e-6
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = self.param(
        'scale', nn.with_logical_partitioning(nn.initializers.ones, ('embed',)),
        (x.shape[-1],), self.param_dtype)
    x = x.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) +
                          self.epsilon)
    return (x * scale.astype(jnp.float32)).astype(self.dtype)


class RelativePositionBias(nn.Module):
  """Per-head learned bias over bucketed relative positions, (1, H, Lq, Lk).

  The bias is returned in float32 whatever `dtype` is, because it is added to
  the float32 attention logits.
  """
  num_heads: int
  num_buckets: int = 32
  max_distance: int = 128
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, query_length: int, key_length: int) -> Array:
    table = self.param(
        'rel_embedding',
        nn.with_logical_partitioning(
            nn.initializers.variance_scaling(1.0, 'fan_avg', 'uniform'),
            ('heads', 'relpos_buckets')),
        (self.num_heads, self.num_buckets), self.param_dtype)
    buckets = relative_position_buckets(query_length, key_length,
                                        self.num_buckets, self.max_distance,
                                        bidirectional=True)
    # Gather via a static index; the table is tiny so this is cheap.
    bias = jnp.take(table.astype(jnp.float32), jnp.asarray(buckets), axis=1)
    return bias[None]


class T5SelfAttention(nn.Module):
  """Multi-head self-attention with an additive bias and no logit scaling."""
  num_heads: int
  d_kv: int
  dropout_rate: float = 0.0
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, x: Array, bias: Array, deterministic: bool = True
               ) -> Array:
    d_model = x.shape[-1]
    base_init = nn.initializers.variance_scaling(1.0, 'fan_in', 'normal')

    def query_init(*args):
      # T5 never divides the logits by sqrt(d_kv): the init carries it.
      return base_init(*args) / math.sqrt(self.d_kv)

    def proj(name, init):
      return layers.DenseGeneral(
          features=(self.num_heads, self.d_kv),
          kernel_axes=('embed', 'heads', 'kv'),
          use_bias=False,
          kernel_init=init,
          dtype=self.dtype,
          param_dtype=self.param_dtype,
          name=name)

    act_axes = ('act_batch', 'act_len', 'act_heads', None)
    q = nn.with_logical_constraint(proj('query', query_init)(x), act_axes)
    k = nn.with_logical_constraint(proj('key', base_init)(x), act_axes)
    v = nn.with_logical_constraint(proj('value', base_init)(x), act_axes)

    logits = jnp.einsum('bqhd,bkhd->bhqk', q, k).astype(jnp.float32)
    weights = jax.nn.softmax(logits + bias, axis=-1).astype(self.dtype)
    weights = nn.Dropout(self.dropout_rate, name='attention_dropout')(
        weights, deterministic=deterministic)
    out = jnp.einsum('bhqk,bkhd->bqhd', weights, v)
    out = nn.with_logical_constraint(out, act_axes)
    return layers.DenseGeneral(
        features=(d_model,),
        kernel_axes=('heads', 'kv', 'embed'),
        axis=(-2, -1),
        use_bias=False,
        kernel_init=base_init,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name='out')(out)


class T5GatedMlp(nn.Module):
  """wo(gelu_tanh(wi_0 x) * wi_1 x): T5 v1.1's gated-GELU feed-forward."""
  d_ff: int
  dropout_rate: float = 0.0
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, x: Array, deterministic: bool = True) -> Array:
    d_model = x.shape[-1]
    init = nn.initializers.variance_scaling(1.0, 'fan_in', 'truncated_normal')

    def dense(features, axes, name):
      return layers.DenseGeneral(
          features=(features,), kernel_axes=axes, use_bias=False,
          kernel_init=init,
          dtype=self.dtype, param_dtype=self.param_dtype, name=name)

    gate = jax.nn.gelu(dense(self.d_ff, ('embed', 'mlp'), 'wi_0')(x),
                       approximate=True)
    linear = dense(self.d_ff, ('embed', 'mlp'), 'wi_1')(x)
    h = nn.with_logical_constraint(gate * linear,
                                   ('act_batch', 'act_len', 'act_mlp'))
    h = nn.Dropout(self.dropout_rate, name='mlp_dropout')(
        h, deterministic=deterministic)
    return dense(d_model, ('mlp', 'embed'), 'wo')(h)


class T5EncoderLayer(nn.Module):
  """Pre-norm residual block: attention then gated MLP."""
  num_heads: int
  d_kv: int
  d_ff: int
  layer_norm_epsilon: float = 1e-6
  dropout_rate: float = 0.0
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, x: Array, bias: Array, deterministic: bool = True
               ) -> Array:
    act_axes = ('act_batch', 'act_len', 'act_embed')
    norm = lambda name: T5LayerNorm(  # pylint: disable=g-long-lambda
        epsilon=self.layer_norm_epsilon, dtype=self.dtype,
        param_dtype=self.param_dtype, name=name)
    drop = nn.Dropout(self.dropout_rate, name='residual_dropout')

    h = norm('pre_attention_layer_norm')(x)
    h = T5SelfAttention(
        num_heads=self.num_heads, d_kv=self.d_kv,
        dropout_rate=self.dropout_rate, dtype=self.dtype,
        param_dtype=self.param_dtype, name='attention')(
            h, bias, deterministic=deterministic)
    x = x + drop(h, deterministic=deterministic)
    x = nn.with_logical_constraint(x, act_axes)

    h = norm('pre_mlp_layer_norm')(x)
    h = T5GatedMlp(
        d_ff=self.d_ff, dropout_rate=self.dropout_rate, dtype=self.dtype,
        param_dtype=self.param_dtype, name='mlp')(
            h, deterministic=deterministic)
    x = x + drop(h, deterministic=deterministic)
    return nn.with_logical_constraint(x, act_axes)


class Embed(nn.Module):
  """Token embedding table (vocab, embed); T5 does not scale the lookup."""
  num_embeddings: int
  features: int
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, ids: Array) -> Array:
    table = self.param(
        'embedding',
        nn.with_logical_partitioning(nn.initializers.normal(stddev=1.0),
                                     ('vocab', 'embed')),
        (self.num_embeddings, self.features), self.param_dtype)
    return jnp.take(table, ids.astype(jnp.int32), axis=0).astype(self.dtype)


class T5Encoder(nn.Module):
  """T5 v1.1 encoder: token ids (B, L) -> embeddings (B, L, d_model), mask.

  Attributes:
    vocab_size: rows of the token embedding.
    d_model: width of the residual stream.
    d_kv: width of one attention head.
    d_ff: hidden width of the gated MLP.
    num_heads: attention heads.
    num_layers: encoder blocks.
    relative_attention_num_buckets: relative position buckets.
    relative_attention_max_distance: distance at which buckets saturate.
    layer_norm_epsilon: RMS norm epsilon.
    dropout_rate: dropout everywhere T5 has it; only active when
      `deterministic=False` (Phenaki keeps the encoder frozen, so never).
    dtype: compute dtype (e.g. bfloat16); norms and softmax stay in float32.
    param_dtype: dtype parameters are created in.
  """
  vocab_size: int = 32128
  d_model: int = 512
  d_kv: int = 64
  d_ff: int = 1024
  num_heads: int = 6
  num_layers: int = 8
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6
  dropout_rate: float = 0.0
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, ids: Array, mask: Optional[Array] = None,
               deterministic: bool = True) -> tuple[Array, Array]:
    """Encodes token ids.

    Args:
      ids: int (B, L) token ids; 0 is padding.
      mask: optional bool (B, L), True for real tokens. Defaults to ids != 0.
      deterministic: disables dropout.

    Returns:
      (embeddings (B, L, d_model) in `dtype`, mask (B, L) bool).
    """
    if mask is None:
      mask = ids != PAD_ID
    mask = mask.astype(jnp.bool_)
    length = ids.shape[-1]

    x = Embed(
        num_embeddings=self.vocab_size, features=self.d_model,
        dtype=self.dtype, param_dtype=self.param_dtype,
        name='token_embedder')(ids)
    act_axes = ('act_batch', 'act_len', 'act_embed')
    x = nn.with_logical_constraint(x, act_axes)
    x = nn.Dropout(self.dropout_rate, name='embed_dropout')(
        x, deterministic=deterministic)

    # One bias for all layers (T5 computes it in the first block and reuses
    # it); padded keys are folded into the same float32 bias.
    bias = RelativePositionBias(
        num_heads=self.num_heads,
        num_buckets=self.relative_attention_num_buckets,
        max_distance=self.relative_attention_max_distance,
        dtype=self.dtype, param_dtype=self.param_dtype,
        name='relpos_bias')(length, length)
    bias = bias + jnp.where(mask, 0.0, _MASK_BIAS).astype(
        jnp.float32)[:, None, None, :]

    for i in range(self.num_layers):
      x = T5EncoderLayer(
          num_heads=self.num_heads, d_kv=self.d_kv, d_ff=self.d_ff,
          layer_norm_epsilon=self.layer_norm_epsilon,
          dropout_rate=self.dropout_rate, dtype=self.dtype,
          param_dtype=self.param_dtype, name=f'layers_{i}')(
              x, bias, deterministic=deterministic)

    x = T5LayerNorm(epsilon=self.layer_norm_epsilon, dtype=self.dtype,
                    param_dtype=self.param_dtype, name='encoder_norm')(x)
    x = nn.Dropout(self.dropout_rate, name='output_dropout')(
        x, deterministic=deterministic)
    return nn.with_logical_constraint(x, act_axes), mask


def param_shapes(module: T5Encoder) -> dict[str, Any]:
  """Unboxed parameter tree of ShapeDtypeStructs, without allocating."""
  variables = jax.eval_shape(
      module.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
  return nn.unbox(variables['params'])
