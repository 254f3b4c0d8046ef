"""CLIP (ViT image tower + causal text transformer) in Linen, for CLIP score.

A port of OpenAI's CLIP as open_clip builds it (`open_clip.CLIP` with a ViT
vision tower and the default text tower), so OpenAI and open_clip ViT
checkpoints load directly (see `clip_weights.py`). Only inference is needed
(the model scores generated videos), so there is no dropout, patch dropout or
gradient checkpointing.

Numerics follow the PyTorch reference:
  * LayerNorm with epsilon 1e-5 (torch's default, not flax's 1e-6), computed
    in float32 whatever the compute dtype;
  * pre-LN residual blocks: x + attn(ln_1(x)), then x + mlp(ln_2(x));
  * attention with q/k/v/out biases, logits scaled by 1/sqrt(head_dim),
    softmax in float32; the text tower is causal;
  * MLP activation QuickGELU (x * sigmoid(1.702 x), what every OpenAI model was
    trained with) or exact erf GELU (torch `nn.GELU()`, most LAION models);
  * image embedding: class token -> ln_post -> proj; text embedding: the token
    at argmax(ids) (the EOT token has the largest id, 49407) -> text_projection,
    after ln_final.

Parameters use logical axis names like the rest of the package (attention
kernels as (embed, heads, kv) so heads shard on 'tensor').
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from phenaki_jax.models import layers

Array = jax.Array
DType = Any

# OpenAI's image normalisation (open_clip OPENAI_DATASET_MEAN / _STD).
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

_LN_EPSILON = 1e-5
# Additive mask for future tokens in the causal text tower. -inf as in the
# reference; every row keeps its diagonal, so no row is fully masked.
_CAUSAL_BIAS = -jnp.inf


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  """Sizes of a ViT CLIP; `make_module` turns them into a `CLIP` module.

  Heads are not visible in the weights' shapes: OpenAI and open_clip use
  64-wide heads for every released ViT, which is what the loader assumes.
  """
  embed_dim: int = 512
  image_size: int = 224
  patch_size: int = 32
  vision_width: int = 768
  vision_layers: int = 12
  vision_heads: int = 12
  vision_mlp_dim: int = 3072
  context_length: int = 77
  vocab_size: int = 49408
  text_width: int = 512
  text_layers: int = 12
  text_heads: int = 8
  text_mlp_dim: int = 2048
  quick_gelu: bool = True

  def __post_init__(self):
    if self.image_size % self.patch_size:
      raise ValueError(f'image_size {self.image_size} is not a multiple of '
                       f'patch_size {self.patch_size}')
    for width, heads, tower in ((self.vision_width, self.vision_heads,
                                 'vision'),
                                (self.text_width, self.text_heads, 'text')):
      if heads < 1 or width % heads:
        raise ValueError(f'{tower} width {width} is not divisible by '
                         f'{heads} heads')

  @property
  def grid_size(self) -> int:
    return self.image_size // self.patch_size

  def make_module(self, dtype: DType = jnp.float32,
                  param_dtype: DType = jnp.float32) -> 'CLIP':
    return CLIP(**dataclasses.asdict(self), dtype=dtype,
                param_dtype=param_dtype)


# OpenAI's released ViTs (the 'openai' weights of open_clip): all QuickGELU.
VIT_B_32 = CLIPConfig()
VIT_B_16 = CLIPConfig(patch_size=16)
VIT_L_14 = CLIPConfig(
    embed_dim=768, patch_size=14, vision_width=1024, vision_layers=24,
    vision_heads=16, vision_mlp_dim=4096, text_width=768, text_heads=12,
    text_mlp_dim=3072)

PRESETS = {'ViT-B-32': VIT_B_32, 'ViT-B-16': VIT_B_16, 'ViT-L-14': VIT_L_14}


def quick_gelu(x: Array) -> Array:
  return x * jax.nn.sigmoid(1.702 * x)


class CLIPLayerNorm(nn.Module):
  """torch-style LayerNorm (epsilon 1e-5) in float32, params on 'embed'."""
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    width = x.shape[-1]
    scale = self.param(
        'scale', nn.with_logical_partitioning(nn.initializers.ones,
                                              ('embed',)),
        (width,), self.param_dtype)
    bias = self.param(
        'bias', nn.with_logical_partitioning(nn.initializers.zeros,
                                             ('embed',)),
        (width,), self.param_dtype)
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    y = (x - mean) * jax.lax.rsqrt(var + _LN_EPSILON)
    y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return y.astype(self.dtype)


class CLIPAttention(nn.Module):
  """Multi-head self-attention with biases (torch nn.MultiheadAttention)."""
  num_heads: int
  causal: bool = False
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    width = x.shape[-1]
    head_dim = width // self.num_heads

    def proj(name):
      return layers.DenseGeneral(
          features=(self.num_heads, head_dim),
          kernel_axes=('embed', 'heads', 'kv'), use_bias=True,
          dtype=self.dtype, param_dtype=self.param_dtype, name=name)

    act_axes = ('act_batch', 'act_len', 'act_heads', None)
    q = nn.with_logical_constraint(proj('query')(x), act_axes)
    k = nn.with_logical_constraint(proj('key')(x), act_axes)
    v = nn.with_logical_constraint(proj('value')(x), act_axes)
    logits = jnp.einsum('bqhd,bkhd->bhqk', q, k).astype(jnp.float32)
    logits = logits / np.float32(math.sqrt(head_dim))
    if self.causal:
      length = x.shape[-2]
      future = np.triu(np.ones((length, length), bool), k=1)
      logits = jnp.where(future, _CAUSAL_BIAS, logits)
    weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    out = jnp.einsum('bhqk,bkhd->bqhd', weights, v)
    out = nn.with_logical_constraint(out, act_axes)
    return layers.DenseGeneral(
        features=(width,), kernel_axes=('heads', 'kv', 'embed'),
        axis=(-2, -1), use_bias=True, dtype=self.dtype,
        param_dtype=self.param_dtype, name='out')(out)


class CLIPMlp(nn.Module):
  """c_proj(act(c_fc(x))) with QuickGELU or exact GELU."""
  mlp_dim: int
  quick_gelu: bool = True
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    width = x.shape[-1]
    h = layers.DenseGeneral(
        features=self.mlp_dim, kernel_axes=('embed', 'mlp'), use_bias=True,
        dtype=self.dtype, param_dtype=self.param_dtype, name='c_fc')(x)
    # Computed in float32: QuickGELU's sigmoid saturates early in bf16.
    h32 = h.astype(jnp.float32)
    h = (quick_gelu(h32) if self.quick_gelu
         else jax.nn.gelu(h32, approximate=False)).astype(self.dtype)
    h = nn.with_logical_constraint(h, ('act_batch', 'act_len', 'act_mlp'))
    return layers.DenseGeneral(
        features=width, kernel_axes=('mlp', 'embed'), use_bias=True,
        dtype=self.dtype, param_dtype=self.param_dtype, name='c_proj')(h)


class ResidualAttentionBlock(nn.Module):
  """Pre-LN block: x + attn(ln_1(x)); x + mlp(ln_2(x))."""
  num_heads: int
  mlp_dim: int
  quick_gelu: bool = True
  causal: bool = False
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    act_axes = ('act_batch', 'act_len', 'act_embed')
    h = CLIPAttention(num_heads=self.num_heads, causal=self.causal,
                      name='attn', **kw)(CLIPLayerNorm(name='ln_1', **kw)(x))
    x = nn.with_logical_constraint(x + h, act_axes)
    h = CLIPMlp(mlp_dim=self.mlp_dim, quick_gelu=self.quick_gelu, name='mlp',
                **kw)(CLIPLayerNorm(name='ln_2', **kw)(x))
    return nn.with_logical_constraint(x + h, act_axes)


class CLIPTransformer(nn.Module):
  """`num_layers` residual blocks named resblocks_{i} (open_clip's order)."""
  num_layers: int
  num_heads: int
  mlp_dim: int
  quick_gelu: bool = True
  causal: bool = False
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    for i in range(self.num_layers):
      x = ResidualAttentionBlock(
          num_heads=self.num_heads, mlp_dim=self.mlp_dim,
          quick_gelu=self.quick_gelu, causal=self.causal, dtype=self.dtype,
          param_dtype=self.param_dtype, name=f'resblocks_{i}')(x)
    return x


def _embedding_init(stddev: float, axes: tuple[str | None, ...]):
  return nn.with_logical_partitioning(nn.initializers.normal(stddev), axes)


class VisionTower(nn.Module):
  """ViT: patches + class token + positions -> ln_pre -> blocks -> ln_post.

  Takes normalised images (B, image_size, image_size, 3) (see
  `preprocess_frames`) and returns unnormalised embeddings (B, output_dim).
  """
  image_size: int
  patch_size: int
  width: int
  num_layers: int
  num_heads: int
  mlp_dim: int
  output_dim: int
  quick_gelu: bool = True
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, images: Array) -> Array:
    b, h, w, c = images.shape
    p = self.patch_size
    if (h, w) != (self.image_size, self.image_size):
      raise ValueError(f'VisionTower expects {self.image_size}x'
                       f'{self.image_size} images, got {h}x{w}')
    # conv1 (stride = kernel = patch, no bias) as a dense layer over
    # non-overlapping patches; patches are row-major like torch's flatten.
    patches = images.reshape(b, h // p, p, w // p, p, c)
    patches = patches.transpose(0, 1, 3, 2, 4, 5).reshape(b, -1, p, p, c)
    x = layers.DenseGeneral(
        features=self.width, kernel_axes=(None, None, None, 'embed'),
        axis=(-3, -2, -1), use_bias=False, dtype=self.dtype,
        param_dtype=self.param_dtype, name='conv1')(patches)
    scale = self.width ** -0.5
    cls = self.param('class_embedding', _embedding_init(scale, ('embed',)),
                     (self.width,), self.param_dtype)
    num_tokens = (self.image_size // p) ** 2 + 1
    pos = self.param('positional_embedding',
                     _embedding_init(scale, (None, 'embed')),
                     (num_tokens, self.width), self.param_dtype)
    cls = jnp.broadcast_to(cls.astype(self.dtype), (b, 1, self.width))
    x = jnp.concatenate([cls, x], axis=1) + pos.astype(self.dtype)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = CLIPLayerNorm(name='ln_pre', **kw)(x)
    x = nn.with_logical_constraint(x, ('act_batch', 'act_len', 'act_embed'))
    x = CLIPTransformer(num_layers=self.num_layers, num_heads=self.num_heads,
                        mlp_dim=self.mlp_dim, quick_gelu=self.quick_gelu,
                        name='transformer', **kw)(x)
    # ln_post is per token, so norming only the class token is the same as
    # open_clip's norm-all-then-pool.
    x = CLIPLayerNorm(name='ln_post', **kw)(x[:, 0])
    proj = self.param('proj', _embedding_init(scale, ('embed', None)),
                      (self.width, self.output_dim), self.param_dtype)
    return x @ proj.astype(self.dtype)


class TextTower(nn.Module):
  """Causal transformer: token ids (B, context_length) -> (B, output_dim)."""
  context_length: int
  vocab_size: int
  width: int
  num_layers: int
  num_heads: int
  mlp_dim: int
  output_dim: int
  quick_gelu: bool = True
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, ids: Array) -> Array:
    if ids.shape[-1] != self.context_length:
      # Positions are learned for exactly context_length tokens; the
      # tokenizer pads to it.
      raise ValueError(f'TextTower expects {self.context_length} tokens, got '
                       f'{ids.shape[-1]}')
    ids = ids.astype(jnp.int32)
    table = self.param('token_embedding', _embedding_init(0.02, ('vocab',
                                                                  'embed')),
                       (self.vocab_size, self.width), self.param_dtype)
    pos = self.param('positional_embedding',
                     _embedding_init(0.01, (None, 'embed')),
                     (self.context_length, self.width), self.param_dtype)
    x = jnp.take(table, ids, axis=0).astype(self.dtype) + pos.astype(
        self.dtype)
    x = nn.with_logical_constraint(x, ('act_batch', 'act_len', 'act_embed'))
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = CLIPTransformer(num_layers=self.num_layers, num_heads=self.num_heads,
                        mlp_dim=self.mlp_dim, quick_gelu=self.quick_gelu,
                        causal=True, name='transformer', **kw)(x)
    x = CLIPLayerNorm(name='ln_final', **kw)(x)
    # OpenAI pools at argmax(ids): EOT (49407) is the largest id in the
    # vocabulary, so this is the EOT position (the first one on ties, like
    # torch.argmax), and with causal attention it has seen the whole caption.
    eot = jnp.argmax(ids, axis=-1)
    x = jnp.take_along_axis(x, eot[:, None, None], axis=1)[:, 0]
    proj = self.param('text_projection',
                      _embedding_init(self.width ** -0.5, ('embed', None)),
                      (self.width, self.output_dim), self.param_dtype)
    return x @ proj.astype(self.dtype)


def l2_normalize(x: Array) -> Array:
  x = x.astype(jnp.float32)
  # Same guard as torch F.normalize (eps 1e-12 on the norm).
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class CLIP(nn.Module):
  """Both towers and the logit scale; fields as in `CLIPConfig`.

  `__call__(images, ids)` returns (image embeddings, text embeddings, logit
  scale) with L2-normalised float32 embeddings; `encode_image` and
  `encode_text` (via `apply(..., method=...)`) run one tower.
  """
  embed_dim: int = 512
  image_size: int = 224
  patch_size: int = 32
  vision_width: int = 768
  vision_layers: int = 12
  vision_heads: int = 12
  vision_mlp_dim: int = 3072
  context_length: int = 77
  vocab_size: int = 49408
  text_width: int = 512
  text_layers: int = 12
  text_heads: int = 8
  text_mlp_dim: int = 2048
  quick_gelu: bool = True
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32

  def setup(self):
    kw = dict(quick_gelu=self.quick_gelu, output_dim=self.embed_dim,
              dtype=self.dtype, param_dtype=self.param_dtype)
    self.visual = VisionTower(
        image_size=self.image_size, patch_size=self.patch_size,
        width=self.vision_width, num_layers=self.vision_layers,
        num_heads=self.vision_heads, mlp_dim=self.vision_mlp_dim, **kw)
    self.text = TextTower(
        context_length=self.context_length, vocab_size=self.vocab_size,
        width=self.text_width, num_layers=self.text_layers,
        num_heads=self.text_heads, mlp_dim=self.text_mlp_dim, **kw)
    # log(1 / 0.07), CLIP's initial temperature; trained checkpoints hold
    # ~log(100).
    self.logit_scale = self.param(
        'logit_scale',
        nn.with_logical_partitioning(
            nn.initializers.constant(math.log(1 / 0.07)), ()),
        (), self.param_dtype)

  def encode_image(self, images: Array) -> Array:
    """Normalised images (B, S, S, 3) -> L2-normalised (B, embed_dim) f32."""
    return l2_normalize(self.visual(images))

  def encode_text(self, ids: Array) -> Array:
    """Token ids (B, context_length) -> L2-normalised (B, embed_dim) f32."""
    return l2_normalize(self.text(ids))

  def __call__(self, images: Array, ids: Array
               ) -> tuple[Array, Array, Array]:
    return (self.encode_image(images), self.encode_text(ids),
            self.logit_scale.astype(jnp.float32))


def logits(image_embeddings: Array, text_embeddings: Array,
           logit_scale: Array) -> Array:
  """exp(logit_scale) * cosine, (num_images, num_texts), as CLIP's forward."""
  return jnp.exp(logit_scale) * image_embeddings @ text_embeddings.T


def resize_shape(height: int, width: int, size: int) -> tuple[int, int]:
  """Shortest side -> size, the other scaled and truncated (torchvision)."""
  if height <= width:
    return size, int(size * width / height)
  return int(size * height / width), size


def preprocess_frames(frames: Array, image_size: int,
                      mean: tuple[float, ...] = OPENAI_MEAN,
                      std: tuple[float, ...] = OPENAI_STD) -> Array:
  """uint8 RGB frames (..., H, W, 3) -> CLIP input (..., S, S, 3) float32.

  OpenAI's preprocessing, jittable: resize the shortest side to `image_size`
  with bicubic interpolation, centre-crop to a square, scale to [0, 1], then
  normalise with `mean` / `std`.

  Bicubic because CLIP was trained and evaluated with PIL bicubic resizing;
  `jax.image.resize` uses the same Keys kernel (a = -0.5) and, when
  downscaling, widens it by the scale factor (antialias) as PIL does. It
  works in float without PIL's rounding to uint8 after the resize, so pixels
  differ from PIL's by under 1/255 (measured in the tests).

  Args:
    frames: uint8 (or float in [0, 255]) array, channels last, RGB.
    image_size: the model's input side S.
    mean: per-channel mean on the [0, 1] scale.
    std: per-channel std on the [0, 1] scale.

  Returns:
    float32 (..., S, S, 3).
  """
  frames = jnp.asarray(frames)
  *lead, h, w, c = frames.shape
  new_h, new_w = resize_shape(h, w, image_size)
  x = frames.astype(jnp.float32) / 255.0
  if (new_h, new_w) != (h, w):
    x = jax.image.resize(x, (*lead, new_h, new_w, c), method='bicubic',
                         antialias=True)
  # torchvision CenterCrop: offset round((in - out) / 2).
  top = int(round((new_h - image_size) / 2.0))
  left = int(round((new_w - image_size) / 2.0))
  x = x[..., top:top + image_size, left:left + image_size, :]
  # PIL clamps to [0, 255] after resizing; bicubic overshoots otherwise.
  x = jnp.clip(x, 0.0, 1.0)
  return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def param_shapes(module: CLIP) -> dict[str, Any]:
  """Unboxed parameter tree of ShapeDtypeStructs, without allocating."""
  images = jnp.zeros((1, module.image_size, module.image_size, 3))
  ids = jnp.zeros((1, module.context_length), jnp.int32)
  variables = jax.eval_shape(module.init, jax.random.key(0), images, ids)
  return nn.unbox(variables['params'])
