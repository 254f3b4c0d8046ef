"""Metric averaging over a log interval."""
import jax.numpy as jnp
import pytest

from phenaki_jax import metrics


def test_accumulator_averages_each_key_over_the_steps_that_logged_it():
  acc = metrics.StepAccumulator()
  acc.add("video", {"train/loss": jnp.float32(4.0)})
  acc.add("video", {"train/loss": jnp.float32(2.0)})
  # The GAN turns on mid-interval: its key appears in later steps only.
  acc.add("video", {"train/loss": jnp.float32(3.0), "train/gan/r1": jnp.float32(0.5)})
  acc.add("image", {"train/loss": jnp.float32(7.0), "train/gan/r1": jnp.float32(1.5)})
  out = acc.means(per_kind=("train/loss", "train/gan/r1"))
  assert out["train/loss"] == pytest.approx(4.0)
  assert out["train/gan/r1"] == pytest.approx(1.0)
  assert out["train/video/loss"] == pytest.approx(3.0)
  assert out["train/image/loss"] == pytest.approx(7.0)
  assert out["train/video/gan/r1"] == pytest.approx(0.5)
  assert out["train/video_steps"] == 3 and out["train/image_steps"] == 1
  # The next interval starts empty.
  acc.add("video", {"train/loss": jnp.float32(1.0)})
  assert acc.means() == {"train/loss": 1.0, "train/video_steps": 1.0}
