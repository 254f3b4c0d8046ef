"""Loss terms of the tokenizer objective.

The paper's full objective is L_VQ + 0.1·L_adv + 0.1·L_IP + 1.0·L_VP + 1.0·L2;
each term is a function here and the trainer weights them from config.loss.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def l2_loss(target: jax.Array, prediction: jax.Array) -> jax.Array:
  """Mean squared error over every pixel and channel."""
  return jnp.mean(jnp.square(prediction.astype(jnp.float32) - target.astype(jnp.float32)))


def vq_loss(codebook_loss: jax.Array, commitment_loss: jax.Array,
            commitment_cost: float) -> jax.Array:
  """L_VQ = ||sg(z) - e||² + β·||z - sg(e)||²."""
  return codebook_loss + commitment_cost * commitment_loss


def psnr(target: jax.Array, prediction: jax.Array, max_range: float = 2.0) -> jax.Array:
  """PSNR in dB for videos in [-1, 1] (range 2), averaged per example."""
  err = jnp.square(jnp.clip(prediction, -1, 1) - target).reshape(target.shape[0], -1).mean(-1)
  return jnp.mean(10.0 * jnp.log10(max_range**2 / jnp.maximum(err, 1e-10)))
