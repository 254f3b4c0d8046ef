"""C-ViViT: the causal video tokenizer of Phenaki.

A clip of T = 1 + k·t_p frames becomes 1 + k token frames: the first frame is
cut into 2D patches (p×p), the later frames into tubelets (t_p×p×p). A spatial
transformer mixes tokens within each token frame, then a causal temporal
transformer mixes token frames, so the codes of token frame i depend only on
frames 0 … i·t_p. An image is a 1-frame clip and only takes the first-frame
path; because of causality its codes equal those of a video's first frame.

Token frame i covers frame 0 when i = 0, else frames 1+(i-1)·t_p … i·t_p.
"""
from __future__ import annotations

from typing import Any

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

from phenaki_jax.models.layers import (DenseGeneral, Transformer, TransformerSpec, constrain,
                                      sinusoidal_embedding)
from phenaki_jax.models.quantizer import VectorQuantizer

Dtype = Any


def num_token_frames(num_frames: int, temporal_patch_size: int) -> int:
  if num_frames < 1 or (num_frames - 1) % temporal_patch_size:
    raise ValueError(
        f"a clip of {num_frames} frames cannot be tokenized: C-ViViT needs 1 + k·{temporal_patch_size} "
        f"frames (first frame + tubelets of {temporal_patch_size})")
  return 1 + (num_frames - 1) // temporal_patch_size


def num_frames_of(token_frames: int, temporal_patch_size: int) -> int:
  """Frames that make `token_frames` token frames (the inverse of num_token_frames)."""
  return 1 + (token_frames - 1) * temporal_patch_size


class _SpaceTimeTransformer(nn.Module):
  """Spatial transformer within token frames plus causal temporal across them."""
  spatial_spec: TransformerSpec
  temporal_spec: TransformerSpec
  temporal_first: bool

  def _spatial(self, x: jax.Array) -> jax.Array:
    b, t, h, w, d = x.shape
    y = x.reshape(b * t, h * w, d)
    y = self.spatial(y)
    return y.reshape(b, t, h, w, d)

  def _temporal(self, x: jax.Array) -> jax.Array:
    b, t, h, w, d = x.shape
    y = einops.rearrange(x, "b t h w d -> (b h w) t d")
    y = y + sinusoidal_embedding(jnp.arange(t), d).astype(y.dtype)
    y = self.temporal(y)
    return einops.rearrange(y, "(b h w) t d -> b t h w d", b=b, h=h, w=w)

  def setup(self):
    self.spatial = Transformer(self.spatial_spec, causal=False)
    # Causal in time: the property the whole tokenizer is built around.
    self.temporal = Transformer(self.temporal_spec, causal=True)

  def __call__(self, x: jax.Array) -> jax.Array:
    if self.temporal_first:
      return self._spatial(self._temporal(x))
    return self._temporal(self._spatial(x))


class CViViT(nn.Module):
  """Encoder, vector quantiser and mirrored decoder.

  `__call__(video)` returns (reconstruction, aux) with aux['codes'] of shape
  (B, 1 + k, H/p, W/p). Videos are float in [-1, 1], shape (B, T, H, W, C).
  """
  image_size: int
  patch_size: int
  temporal_patch_size: int
  # The stacks within a token frame (spatial) and across token frames (temporal,
  # causal), the same in the encoder and the mirrored decoder. They share the
  # residual width and the dtypes, which the layers around them use too.
  spatial_spec: TransformerSpec
  temporal_spec: TransformerSpec
  codebook_size: int
  code_dim: int
  channels: int = 3

  @property
  def width(self) -> int:
    return self.spatial_spec.width

  @property
  def dtype(self) -> Dtype:
    return self.spatial_spec.dtype

  @property
  def param_dtype(self) -> Dtype:
    return self.spatial_spec.param_dtype

  @property
  def grid_size(self) -> int:
    return self.image_size // self.patch_size

  def setup(self):
    p, tp, c = self.patch_size, self.temporal_patch_size, self.channels
    dense = lambda features, axes, name: DenseGeneral(
        features, kernel_axes=axes, dtype=self.dtype, param_dtype=self.param_dtype, name=name)
    a, b = self.spatial_spec, self.temporal_spec
    if (a.width, a.dtype, a.param_dtype) != (b.width, b.dtype, b.param_dtype):
      raise ValueError(f"the spatial and temporal stacks must share width, dtype and param_dtype; "
                       f"got {(a.width, a.dtype, a.param_dtype)} and "
                       f"{(b.width, b.dtype, b.param_dtype)}")
    stack = dict(spatial_spec=a, temporal_spec=b)
    # Encoder.
    self.first_frame_embed = dense(self.width, ("patch", "embed"), "first_frame_embed")
    self.tubelet_embed = dense(self.width, ("patch", "embed"), "tubelet_embed")
    self.encoder_pos = self.param(
        "encoder_spatial_pos",
        nn.with_logical_partitioning(nn.initializers.normal(0.02), ("grid", "embed")),
        (self.grid_size * self.grid_size, self.width), self.param_dtype)
    self.encoder = _SpaceTimeTransformer(temporal_first=False, name="encoder", **stack)
    self.quantizer = VectorQuantizer(self.codebook_size, self.code_dim,
                                     param_dtype=self.param_dtype, name="quantizer")
    # Decoder mirrors the encoder: back to the width, time first, then space.
    self.from_code = dense(self.width, ("code", "embed"), "from_code")
    self.decoder_pos = self.param(
        "decoder_spatial_pos",
        nn.with_logical_partitioning(nn.initializers.normal(0.02), ("grid", "embed")),
        (self.grid_size * self.grid_size, self.width), self.param_dtype)
    self.decoder = _SpaceTimeTransformer(temporal_first=True, name="decoder", **stack)
    self.first_frame_out = dense(p * p * c, ("embed", "patch"), "first_frame_out")
    self.tubelet_out = dense(tp * p * p * c, ("embed", "patch"), "tubelet_out")

  def _check_video(self, video: jax.Array) -> None:
    if video.ndim != 5:
      raise ValueError(f"video must be (batch, frames, height, width, channels); got {video.shape}")
    _, t, h, w, c = video.shape
    num_token_frames(t, self.temporal_patch_size)
    if (h, w, c) != (self.image_size, self.image_size, self.channels):
      raise ValueError(f"video frames are {h}x{w}x{c}; this tokenizer takes "
                       f"{self.image_size}x{self.image_size}x{self.channels}")

  def _add_pos(self, x: jax.Array, pos: jax.Array) -> jax.Array:
    g = self.grid_size
    return x + jnp.asarray(pos, x.dtype).reshape(1, 1, g, g, self.width)

  def encode_features(self, video: jax.Array) -> jax.Array:
    """(B, T, H, W, C) -> continuous features (B, 1 + k, h, w, width)."""
    self._check_video(video)
    p, tp = self.patch_size, self.temporal_patch_size
    video = video.astype(self.dtype)
    first = einops.rearrange(video[:, :1], "b t (h p) (w q) c -> b t h w (p q c)", p=p, q=p)
    x = self.first_frame_embed(first)
    if video.shape[1] > 1:
      rest = einops.rearrange(video[:, 1:], "b (t u) (h p) (w q) c -> b t h w (u p q c)",
                              u=tp, p=p, q=p)
      x = jnp.concatenate([x, self.tubelet_embed(rest)], axis=1)
    x = constrain(x, "act_batch", "act_frames", "act_height", "act_width", "act_embed")
    return self.encoder(self._add_pos(x, self.encoder_pos))

  def encode(self, video: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(B, T, H, W, C) -> (quantised code vectors, aux with 'codes')."""
    return self.quantizer(self.encode_features(video))

  def decode_code_vectors(self, z: jax.Array) -> jax.Array:
    """Code vectors (B, 1 + k, h, w, code_dim) -> video (B, 1 + k·t_p, H, W, C)."""
    p, tp, c = self.patch_size, self.temporal_patch_size, self.channels
    x = self._add_pos(self.from_code(z.astype(self.dtype)), self.decoder_pos)
    x = self.decoder(x)
    first = einops.rearrange(self.first_frame_out(x[:, :1]),
                             "b t h w (p q c) -> b t (h p) (w q) c", p=p, q=p, c=c)
    if x.shape[1] == 1:
      return first.astype(jnp.float32)
    rest = einops.rearrange(self.tubelet_out(x[:, 1:]),
                            "b t h w (u p q c) -> b (t u) (h p) (w q) c", u=tp, p=p, q=p, c=c)
    return jnp.concatenate([first, rest], axis=1).astype(jnp.float32)

  def decode(self, codes: jax.Array) -> jax.Array:
    """Integer codes (B, 1 + k, h, w) -> video (B, 1 + k·t_p, H, W, C)."""
    return self.decode_code_vectors(self.quantizer.lookup(codes))

  def __call__(self, video: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    z, aux = self.encode(video)
    return self.decode_code_vectors(z), aux


def from_config(model_config: Any, image_size: int) -> CViViT:
  """Builds a CViViT from a `config.model` ConfigDict (typed fields, no dict inside)."""
  m = model_config
  return CViViT(
      image_size=image_size,
      patch_size=m.patch_size,
      temporal_patch_size=m.temporal_patch_size,
      spatial_spec=TransformerSpec.from_config(m, depth=m.spatial_depth),
      temporal_spec=TransformerSpec.from_config(m, depth=m.temporal_depth),
      codebook_size=m.codebook_size,
      code_dim=m.code_dim,
  )
