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


# --- Adversarial terms. Logits are the discriminator's raw outputs.

GAN_LOSSES = ("hinge", "non_saturating")


def generator_adversarial_loss(fake_logits: jax.Array, kind: str) -> jax.Array:
  """L_adv for the tokenizer: make the discriminator call reconstructions real."""
  if kind == "hinge":
    return -jnp.mean(fake_logits)
  if kind == "non_saturating":
    return jnp.mean(jax.nn.softplus(-fake_logits))
  raise ValueError(f"GAN loss {kind!r}: expected one of {GAN_LOSSES}")


def discriminator_loss(real_logits: jax.Array, fake_logits: jax.Array, kind: str) -> jax.Array:
  if kind == "hinge":
    return jnp.mean(jax.nn.relu(1.0 - real_logits)) + jnp.mean(jax.nn.relu(1.0 + fake_logits))
  if kind == "non_saturating":
    return jnp.mean(jax.nn.softplus(-real_logits)) + jnp.mean(jax.nn.softplus(fake_logits))
  raise ValueError(f"GAN loss {kind!r}: expected one of {GAN_LOSSES}")


def r1_penalty(logits_fn, real: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(E‖∇ₓD(x)‖² over real x, D(x)): Mescheder et al.'s R1 gradient penalty.

  Returns the logits too, so the caller reuses this forward pass for its
  real-data loss.
  """
  logits, vjp = jax.vjp(logits_fn, real)
  # D acts on each example separately, so the gradient of the sum gives every
  # example's own input gradient.
  (grads,) = vjp(jnp.ones_like(logits))
  per_example = jnp.sum(jnp.square(grads.astype(jnp.float32)).reshape(real.shape[0], -1), -1)
  return jnp.mean(per_example), logits


def lecam_regularizer(real_logits: jax.Array, fake_logits: jax.Array,
                      ema_real: jax.Array, ema_fake: jax.Array) -> jax.Array:
  """LeCam regularisation (Tseng et al. 2021): anchors D's outputs to the
  moving averages of the other side's, which keeps D from overfitting a
  small data set."""
  return (jnp.mean(jnp.square(jax.nn.relu(real_logits - ema_fake)))
          + jnp.mean(jnp.square(jax.nn.relu(ema_real - fake_logits))))
