"""Fréchet distance against a SciPy reference; streaming statistics; I3D features."""
import time

import jax
import numpy as np
import pytest
import scipy.linalg

from phenaki_jax.eval import fvd


def _reference_frechet(x, y):
  """The textbook formula with scipy's general matrix square root."""
  mu1, mu2 = x.mean(0), y.mean(0)
  s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
  covmean = scipy.linalg.sqrtm(s1 @ s2)
  covmean = np.real(covmean)
  return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def _gaussians(seed, n, dim, shift=0.5):
  rng = np.random.default_rng(seed)
  mix = rng.normal(size=(dim, dim)) / np.sqrt(dim)
  x = rng.normal(size=(n, dim)) @ mix
  y = rng.normal(size=(n, dim)) @ (mix + 0.3 * rng.normal(size=(dim, dim)) / np.sqrt(dim)) + shift
  return x, y


@pytest.mark.parametrize("n,dim", [(500, 2), (400, 16), (300, 64),
                                   # fewer samples than dimensions: rank-deficient covariances
                                   (40, 64), (20, 128)])
def test_frechet_distance_matches_scipy_reference(n, dim):
  x, y = _gaussians(n * 1000 + dim, n, dim)
  want = _reference_frechet(x, y)
  got = fvd.fvd_from_features(x, y)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * dim)


@pytest.mark.parametrize("n,dim", [(300, 16), (20, 128)])
def test_identical_sets_give_zero_and_distance_is_symmetric(n, dim):
  x, y = _gaussians(7, n, dim)
  scale = np.trace(np.cov(x, rowvar=False))
  assert fvd.fvd_from_features(x, x) == pytest.approx(0.0, abs=1e-9 * scale)
  np.testing.assert_allclose(fvd.fvd_from_features(x, y), fvd.fvd_from_features(y, x),
                             rtol=1e-9)
  assert fvd.fvd_from_features(x, y) > 0


def test_known_distance_between_isotropic_gaussians():
  # N(0, a²I) vs N(m, b²I) in d dims: |m|² + d·(a - b)².
  d, a, b = 5, 2.0, 0.5
  m = np.arange(d, dtype=np.float64)
  got = fvd.frechet_distance(np.zeros(d), a * a * np.eye(d), m, b * b * np.eye(d))
  assert got == pytest.approx(m @ m + d * (a - b) ** 2, rel=1e-12)


def test_streamed_and_merged_statistics_equal_the_whole_set():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(101, 8)) * 3 + 1e3  # a large mean: naive Σxxᵀ would lose digits
  whole = fvd.FeatureStats.from_features(x)
  streamed = fvd.FeatureStats(dim=8)
  for start in range(0, 101, 16):
    streamed.update(x[start:start + 16])
  merged = fvd.FeatureStats.from_features(x[:30])
  merged.merge(fvd.FeatureStats.from_features(x[30:]))
  for stats in (whole, streamed, merged):
    assert stats.count == 101
    np.testing.assert_allclose(stats.mean, x.mean(0), rtol=1e-13)
    np.testing.assert_allclose(stats.covariance(), np.cov(x, rowvar=False), rtol=1e-10)
  with pytest.raises(ValueError, match="expected"):
    streamed.update(x[:, :4])


@pytest.fixture(scope="module")
def one_device_extractor():
  """Batches of one 9-frame clip (the fewest frames I3D classifies) at 224, on one device."""
  return fvd.I3DFeatureExtractor(num_frames=9, resolution=224, batch_size=1)


def test_i3d_logits_at_224_are_deterministic_and_finite(one_device_extractor):
  """One 9-frame clip, the smallest I3D classifies, at the standard 224 resolution."""
  clip = np.random.default_rng(0).integers(0, 256, size=(1, 9, 32, 32, 3), dtype=np.uint8)
  extractor = one_device_extractor
  assert extractor.placement.num_devices == 1
  first = extractor(clip)
  start = time.perf_counter()
  second = extractor(clip)
  print(f"I3D at 224, one 9-frame clip: {time.perf_counter() - start:.2f} s (compiled)")
  assert first.shape == (1, 400) and first.dtype == np.float64
  assert np.all(np.isfinite(first)) and np.std(first) > 0
  np.testing.assert_array_equal(first, second)
  # uint8 and the same clip in [-1, 1] are one input.
  np.testing.assert_allclose(extractor(clip / 127.5 - 1.0), first, rtol=1e-5, atol=1e-4)


def test_i3d_features_the_same_on_meshes_of_8_2_and_1_devices(monkeypatch):
  """Batches split over the mesh (from a host array, the last padded, and as
  the global array an evaluator hands over) give each clip the same features
  on every process and mesh size. I3D is a cheap stand-in here (its
  placement is under test; the real one compiles for tens of seconds per
  mesh and runs on several processes in tests/integration/multiprocess_test.py)."""
  import jax.numpy as jnp
  from phenaki_jax import sharding
  from phenaki_jax import placement
  from phenaki_jax.pretrained import perceptual

  def cheap_i3d(variables, clips, *, endpoint, resolution):
    return jnp.tanh(clips.reshape(clips.shape[0], -1) @ variables["w"])

  monkeypatch.setattr(perceptual, "i3d_features", cheap_i3d)
  rng = np.random.default_rng(1)
  clips = rng.integers(0, 256, size=(11, 9, 8, 8, 3), dtype=np.uint8)
  variables = {"w": (rng.normal(size=(9 * 8 * 8 * 3, 400)) / 40).astype(np.float32)}
  features = {}
  for n in (8, 2, 1):
    on = placement.Placement(sharding.make_mesh((-1, 1, 1), jax.devices()[:n]))
    extractor = fvd.I3DFeatureExtractor(num_frames=9, batch_size=8, placement=on,
                                        variables=variables)
    features[n] = extractor(clips)  # 2 batches, the last padded
    np.testing.assert_array_equal(extractor(on.put_batch(clips[:8])), features[n][:8])
  assert features[1].shape == (11, 400) and np.std(features[1]) > 0
  for n in (8, 2):
    # (float32 sums of 1,728 products, blocked differently per batch size)
    np.testing.assert_allclose(features[n], features[1], rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match=r"config.eval_protocol.batch_size=3: .* 2 ways"):
    fvd.I3DFeatureExtractor(num_frames=9, batch_size=3, batch_key="eval_protocol.batch_size",
                            placement=placement.Placement(
                                sharding.make_mesh((-1, 1, 1), jax.devices()[:2])))


def test_i3d_protocol_errors_name_the_config_keys():
  with pytest.raises(ValueError, match="config.protocol.fvd_num_frames=5"):
    fvd.I3DFeatureExtractor(num_frames=5)
  extractor = fvd.I3DFeatureExtractor(num_frames=11)
  with pytest.raises(ValueError, match=r"9 frames \(config.input.num_frames\).*"
                                       r"config.protocol.fvd_num_frames"):
    extractor(np.zeros((1, 9, 16, 16, 3), np.uint8))
