"""A StyleGAN-style video discriminator: 3D residual blocks over the whole clip.

It sees every frame of a clip at once (3x3x3 convolutions), so it can judge
motion and temporal flicker, not only single frames. An image is a 1-frame
clip and goes through the same weights. Residual blocks halve space (and time
while more than one frame is left) with average pooling and scale their sum by
1/√2, as StyleGAN2's residual discriminator does.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any

CONV_AXES = ("conv_t", "conv_h", "conv_w", "conv_in", "conv_out")


def _leaky(x: jax.Array) -> jax.Array:
  return nn.leaky_relu(x, 0.2)


class Conv3D(nn.Module):
  """A 'SAME' 3D convolution whose kernel carries logical axis names."""
  features: int
  kernel_size: tuple[int, int, int] = (3, 3, 3)
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    shape = tuple(self.kernel_size) + (x.shape[-1], self.features)
    # He init for the leaky-ReLU stacks (fan-in of the whole receptive field).
    init = nn.initializers.variance_scaling(2.0 / (1 + 0.2**2), "fan_in", "truncated_normal")
    kernel = self.param("kernel", nn.with_logical_partitioning(init, CONV_AXES), shape,
                        self.param_dtype)
    y = jax.lax.conv_general_dilated(x.astype(self.dtype), jnp.asarray(kernel, self.dtype),
                                     (1, 1, 1), "SAME",
                                     dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros,
                                                             ("conv_out",)),
                        (self.features,), self.param_dtype)
      y = y + jnp.asarray(bias, self.dtype)
    return y


def space_to_depth(video: jax.Array, patch: int) -> jax.Array:
  """(B, T, H, W, C) -> (B, T, H/p, W/p, p·p·C), a pure reshape (cheap gradient)."""
  b, t, h, w, c = video.shape
  if h % patch or w % patch:
    raise ValueError(f"frames of {h}x{w} do not divide into {patch}x{patch} patches")
  x = video.reshape(b, t, h // patch, patch, w // patch, patch, c)
  return x.transpose(0, 1, 2, 4, 3, 5, 6).reshape(b, t, h // patch, w // patch, patch * patch * c)


def downsample(x: jax.Array) -> jax.Array:
  """Halves height and width, and time while it is longer than one frame."""
  t = 2 if x.shape[1] > 1 else 1
  return nn.avg_pool(x, (t, 2, 2), strides=(t, 2, 2), padding="SAME", count_include_pad=False)


class DiscriminatorBlock(nn.Module):
  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    skip = Conv3D(self.features, (1, 1, 1), use_bias=False, name="skip", **kw)(downsample(x))
    h = _leaky(Conv3D(x.shape[-1], name="conv1", **kw)(x))
    h = _leaky(Conv3D(self.features, name="conv2", **kw)(h))
    return (downsample(h) + skip) * np.float32(1.0 / np.sqrt(2.0))


class VideoDiscriminator(nn.Module):
  """(B, T, H, W, 3) clips in [-1, 1] -> (B,) real/fake logits."""
  base_features: int = 32
  channel_multipliers: Sequence[int] = (1, 2, 4)
  max_features: int = 512
  # p > 1 folds p×p pixel blocks into channels before the first layer: the
  # full-resolution 3D convolutions dominate the cost (4x less work at p=2)
  # and no pixel is dropped, unlike pooling.
  input_patch: int = 1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, video: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    width = lambda m: min(self.base_features * m, self.max_features)
    if self.input_patch > 1:
      video = space_to_depth(video, self.input_patch)
    x = _leaky(Conv3D(width(1), (1, 1, 1), name="from_rgb", **kw)(video))
    x = nn.with_logical_constraint(x, ("act_batch", "act_frames", "act_height", "act_width",
                                       None))
    for i, mult in enumerate(self.channel_multipliers):
      x = DiscriminatorBlock(width(mult), name=f"block_{i}", **kw)(x)
    x = _leaky(Conv3D(x.shape[-1], name="conv_out", **kw)(x))
    # Mean over what is left of time, so clips and images share the head;
    # the spatial layout stays in the flattened features, as in StyleGAN.
    x = jnp.mean(x.astype(jnp.float32), axis=1)
    x = x.reshape(x.shape[0], -1)
    x = _leaky(nn.Dense(width(self.channel_multipliers[-1]), name="dense",
                        kernel_init=nn.with_logical_partitioning(
                            nn.initializers.lecun_normal(), ("conv_in", "conv_out")),
                        **kw)(x))
    logits = nn.Dense(1, name="logits", kernel_init=nn.with_logical_partitioning(
        nn.initializers.lecun_normal(), ("conv_in", "conv_out")), **kw)(x)
    return logits[:, 0].astype(jnp.float32)


def from_config(gan_config: Any) -> VideoDiscriminator:
  return VideoDiscriminator(base_features=gan_config.base_features,
                            channel_multipliers=tuple(gan_config.channel_multipliers),
                            input_patch=gan_config.input_patch,
                            dtype=jnp.dtype(gan_config.dtype))
