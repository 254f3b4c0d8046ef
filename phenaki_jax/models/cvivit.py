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

from phenaki_jax.models.layers import (DenseGeneral, Transformer, check_attention_impl, constrain,
                                      remat_policy_name, sinusoidal_embedding)
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
  width: int
  num_heads: int
  head_dim: int
  mlp_dim: int
  spatial_depth: int
  temporal_depth: int
  temporal_first: bool
  remat: bool = False
  remat_policy: str = ""
  scan_layers: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: str | None = None
  qk_norm: bool = False
  zero_init_residual: bool = False

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
    kw = dict(num_heads=self.num_heads, head_dim=self.head_dim, mlp_dim=self.mlp_dim,
              remat=self.remat, remat_policy=self.remat_policy, scan_layers=self.scan_layers,
              dtype=self.dtype, param_dtype=self.param_dtype,
              attention_impl=self.attention_impl, qk_norm=self.qk_norm,
              zero_init_residual=self.zero_init_residual)
    self.spatial = Transformer(num_layers=self.spatial_depth, causal=False, **kw)
    # Causal in time: the property the whole tokenizer is built around.
    self.temporal = Transformer(num_layers=self.temporal_depth, causal=True, **kw)

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
  width: int
  num_heads: int
  head_dim: int
  mlp_dim: int
  spatial_depth: int
  temporal_depth: int
  codebook_size: int
  code_dim: int
  channels: int = 3
  remat: bool = False
  # A layers.REMAT_POLICIES name; '' follows `remat`.
  remat_policy: str = ""
  # nn.scan over each stack's blocks (params stacked under 'blocks'; convert
  # with layers.scan_params / unscan_params): same numbers, one block to compile.
  scan_layers: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: str | None = None
  qk_norm: bool = False
  zero_init_residual: bool = False

  @property
  def grid_size(self) -> int:
    return self.image_size // self.patch_size

  def setup(self):
    p, tp, c = self.patch_size, self.temporal_patch_size, self.channels
    dense = lambda features, axes, name: DenseGeneral(
        features, kernel_axes=axes, dtype=self.dtype, param_dtype=self.param_dtype, name=name)
    stack = dict(width=self.width, num_heads=self.num_heads, head_dim=self.head_dim,
                 mlp_dim=self.mlp_dim, spatial_depth=self.spatial_depth,
                 temporal_depth=self.temporal_depth, remat=self.remat,
                 remat_policy=self.remat_policy, scan_layers=self.scan_layers, dtype=self.dtype,
                 param_dtype=self.param_dtype, attention_impl=self.attention_impl,
                 qk_norm=self.qk_norm, zero_init_residual=self.zero_init_residual)
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
      width=m.width,
      num_heads=m.num_heads,
      head_dim=m.head_dim,
      mlp_dim=m.mlp_dim,
      spatial_depth=m.spatial_depth,
      temporal_depth=m.temporal_depth,
      codebook_size=m.codebook_size,
      code_dim=m.code_dim,
      remat=m.remat,
      remat_policy=remat_policy_name(m.remat, m.get("remat_policy", "")),
      scan_layers=m.get("scan_layers", False),
      dtype=jnp.dtype(m.dtype),
      param_dtype=jnp.dtype(m.param_dtype),
      attention_impl=check_attention_impl(m.attention_impl) or None,
      qk_norm=m.qk_norm,
      zero_init_residual=m.zero_init_residual,
  )
