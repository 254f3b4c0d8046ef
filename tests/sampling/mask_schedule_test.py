"""Mask schedules: γ values, decoding counts, training masks."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from phenaki_jax.sampling import mask_schedule


def test_mask_ratio_values():
  r = jnp.array([0.0, 1 / 3, 0.5, 2 / 3, 1.0])
  np.testing.assert_allclose(mask_schedule.mask_ratio(r),
                             [1.0, math.sqrt(3) / 2, math.sqrt(0.5), 0.5, 0.0], atol=1e-6)
  np.testing.assert_allclose(mask_schedule.mask_ratio(r, "linear"), 1 - r, atol=1e-6)
  np.testing.assert_allclose(mask_schedule.mask_ratio(r, "square"), 1 - r * r, atol=1e-6)
  for schedule in mask_schedule.SCHEDULES:
    assert mask_schedule.mask_ratio(0.0, schedule) == 1.0
    assert abs(float(mask_schedule.mask_ratio(1.0, schedule))) < 1e-7
  with pytest.raises(ValueError, match="unknown mask schedule"):
    mask_schedule.mask_ratio(0.5, "exp")


def test_num_masked_follows_cosine_and_ends_at_zero():
  n, steps = 1000, 12
  got = np.asarray(mask_schedule.num_masked(jnp.arange(steps), steps, n))
  want = np.floor(n * np.cos(np.pi / 2 * (np.arange(steps) + 1) / steps)).astype(int)
  want[-1] = 0
  np.testing.assert_array_equal(got, want)
  assert (np.diff(got) <= 0).all()
  # Per-example token counts broadcast.
  got = mask_schedule.num_masked(0, 2, jnp.array([10, 4]))
  np.testing.assert_array_equal(got, [7, 2])  # floor(10·cos(π/4)), floor(4·cos(π/4))
  assert int(mask_schedule.num_masked(0, 1, 50)) == 0


@functools.partial(jax.jit, static_argnames=("shape", "schedule"))
def _masks(rng, shape, schedule="cosine", loss_region=None, num_frozen_frames=0):
  return mask_schedule.sample_mask(rng, shape, schedule, loss_region, num_frozen_frames)


def test_mean_masked_fraction_is_two_over_pi():
  # E[cos(π r / 2)] for r ~ U(0, 1) is 2/π.
  mask = np.asarray(_masks(jax.random.key(0), (4096, 4, 4, 8)))
  frac = mask.reshape(4096, -1).mean(axis=1)
  assert abs(frac.mean() - 2 / np.pi) < 0.02
  # The ratio is spread over (0, 1], not concentrated.
  assert frac.min() < 0.1 and frac.max() == 1.0


def test_exact_counts_per_example():
  # Recompute each example's r from the same key split the function uses.
  # Same shape as above, so the compiled function is reused.
  rng, shape = jax.random.key(3), (4096, 4, 4, 8)
  mask = np.asarray(_masks(rng, shape))
  ratio_rng, _ = jax.random.split(rng)
  gamma = np.asarray(mask_schedule.mask_ratio(jax.random.uniform(ratio_rng, (4096,))))
  want = np.clip(np.round(gamma * 128), 1, 128)
  np.testing.assert_array_equal(mask.reshape(4096, -1).sum(axis=1), want)
  assert mask.dtype == np.bool_


def test_loss_region_respected():
  shape = (256, 3, 2, 4)
  # Image examples (odd rows): only the first token frame may be masked.
  image = (np.arange(256) % 2 == 1)[:, None, None, None]
  region = np.broadcast_to(~image | (np.arange(3) == 0)[None, :, None, None], shape)
  mask = np.asarray(_masks(jax.random.key(1), shape, loss_region=jnp.asarray(region)))
  assert not mask[~region].any()
  counts = mask.reshape(256, -1).sum(axis=1)
  assert (counts >= 1).all()
  assert counts[1::2].max() <= 8 and counts[0::2].max() > 8


def test_frozen_prefix_never_masked():
  shape = (128, 4, 2, 2)
  mask = np.asarray(_masks(jax.random.key(2), shape, num_frozen_frames=jnp.full(128, 2)))
  assert not mask[:, :2].any()
  assert (mask.reshape(128, -1).sum(axis=1) >= 1).all()
  assert mask[:, 2:].all(axis=(1, 2, 3)).any()  # γ near 1 masks the whole free part
  # Per-example prefixes.
  frozen = jnp.array([0, 1, 3, 4] * 32)
  mask = np.asarray(_masks(jax.random.key(4), shape, num_frozen_frames=frozen))
  for b, k in enumerate(np.asarray(frozen)):
    assert not mask[b, :k].any()
  assert not mask[3::4].any()  # nothing left to mask: no token forced
