"""The C-ViViT objective: L_VQ + 0.1·L_adv + 0.1·L_IP + 1.0·L_VP + 1.0·L2, and its GAN.

Each term is a function of (video, reconstruction); compute_losses weights
them from config.loss and, with loss.max_gradient_ratio > 0, balances each
auxiliary term's pixel gradient against the L2 term's.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from phenaki_jax.models import quantizer
from phenaki_jax.pretrained import perceptual
from phenaki_jax.train_state import uses_gan


# --- The loss terms.

def l2_loss(target: jax.Array, prediction: jax.Array) -> jax.Array:
  """Mean squared error over every pixel and channel."""
  return jnp.mean(jnp.square(prediction.astype(jnp.float32) - target.astype(jnp.float32)))


def vq_loss(codebook_loss: jax.Array, commitment_loss: jax.Array,
            commitment_cost: float) -> jax.Array:
  """L_VQ = ||sg(z) - e||² + β·||z - sg(e)||²."""
  return codebook_loss + commitment_cost * commitment_loss


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


# --- The objective.

def load_frozen_networks(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Weights of the pretrained networks the objective uses (none for L2+VQ)."""
  frozen = {}
  if config.loss.lpips_weight > 0:
    frozen["lpips"] = perceptual.lpips_params(config.loss.lpips_net)
  if config.loss.video_perceptual_weight > 0:
    frozen["i3d"] = perceptual.i3d_variables()
  return frozen


def _random_frames(video: jax.Array, count: int, rng: jax.Array) -> jax.Array:
  """`count` distinct random frames of each clip, flattened to (B·count, H, W, C)."""
  b, t = video.shape[:2]
  if count == 0 or count >= t:
    return video.reshape((b * t,) + video.shape[2:])
  order = jnp.argsort(jax.random.uniform(rng, (b, t)), axis=1)[:, :count]
  picked = jnp.take_along_axis(video, order[:, :, None, None, None], axis=1)
  return picked.reshape((b * count,) + video.shape[2:])


def lpips_term(video: jax.Array, recon: jax.Array, loss_cfg: ml_collections.ConfigDict,
               frozen: dict[str, Any], rng: jax.Array) -> jax.Array:
  """L_IP: LPIPS on lpips_frames_per_clip random frames, the same ones of both clips."""
  real = _random_frames(video, loss_cfg.lpips_frames_per_clip, rng)
  fake = _random_frames(recon, loss_cfg.lpips_frames_per_clip, rng)
  return jnp.mean(perceptual.lpips_distance(frozen["lpips"], real, fake, net=loss_cfg.lpips_net))


def video_perceptual_term(video: jax.Array, recon: jax.Array,
                          loss_cfg: ml_collections.ConfigDict,
                          frozen: dict[str, Any]) -> jax.Array:
  """L_VP: distance of I3D features on the first video_perceptual_clips clips."""
  n = loss_cfg.video_perceptual_clips or video.shape[0]
  return jnp.mean(perceptual.i3d_perceptual_distance(
      frozen["i3d"], video[:n], recon[:n], endpoint=loss_cfg.video_perceptual_endpoint,
      resolution=loss_cfg.video_perceptual_resolution or video.shape[2]))


def video_perceptual_applies(video: jax.Array, loss_cfg: ml_collections.ConfigDict) -> bool:
  """L_VP needs a clip of at least video_perceptual_min_frames (images never)."""
  t = video.shape[1]
  return t > 1 and t >= loss_cfg.video_perceptual_min_frames


def compute_losses(model: nn.Module, params: Any, video: jax.Array,
                   loss_cfg: ml_collections.ConfigDict, *, frozen: dict[str, Any] | None = None,
                   rng: jax.Array | None = None, adversarial: Any = None,
                   ) -> tuple[jax.Array, tuple[dict[str, jax.Array], dict[str, jax.Array]]]:
  """(total loss, (its logged parts, auxiliary outputs)) for a float video batch in [-1, 1].

  `adversarial(recon) -> L_adv` is given once the GAN is on. The auxiliary
  outputs are not metrics: 'encoder_vectors', 'errors' and 'counts' restart
  dead codes, 'recon' goes to the discriminator's update.
  """
  recon, aux = model.apply({"params": params}, video)
  l2 = l2_loss(video, recon)
  vq = vq_loss(aux["codebook_loss"], aux["commitment_loss"], loss_cfg.commitment_cost)
  total = loss_cfg.l2_weight * l2 + loss_cfg.vq_weight * vq
  parts = {
      "train/l2": l2,
      "train/vq/loss": vq,
      "train/vq/codebook_loss": aux["codebook_loss"],
      "train/vq/commitment_loss": aux["commitment_loss"],
      "train/vq/usage": aux["usage"],
      "train/vq/perplexity": aux["perplexity"],
  }
  needs_frozen = loss_cfg.lpips_weight > 0 or loss_cfg.video_perceptual_weight > 0
  if needs_frozen and (frozen is None or rng is None):
    raise ValueError("the perceptual terms need the frozen networks and an rng "
                     "(load_frozen_networks(config)); or set their weights to 0")
  # Each auxiliary term as a function of the reconstruction, with its weight.
  extra = {}
  if loss_cfg.lpips_weight > 0:
    extra["lpips"] = (loss_cfg.lpips_weight,
                      lambda r: lpips_term(video, r, loss_cfg, frozen, rng))
  if loss_cfg.video_perceptual_weight > 0 and video_perceptual_applies(video, loss_cfg):
    extra["video_perceptual"] = (
        loss_cfg.video_perceptual_weight,
        lambda r: video_perceptual_term(video, r, loss_cfg, frozen))
  if adversarial is not None:
    extra["gan/generator_loss"] = (loss_cfg.adversarial_weight, adversarial)
  ratio = loss_cfg.max_gradient_ratio
  if ratio > 0 and extra:
    # Gradient balancing in pixel space (VQGAN's adaptive weight, per term
    # and at the decoder's output): each term's gradient with respect to the
    # reconstruction is capped at `ratio` times the L2 term's, so switching
    # the perceptual networks and the GAN on cannot drown the reconstruction
    # signal. The terms' pixel gradients are computed once here and enter
    # the objective as a linear surrogate: one backward pass through the
    # tokenizer, as without balancing.
    fixed = jax.lax.stop_gradient(recon)
    l2_grad = jax.grad(lambda r: loss_cfg.l2_weight * l2_loss(video, r))(fixed)
    l2_norm = jnp.sqrt(jnp.sum(jnp.square(l2_grad)))
    for name, (weight, fn) in extra.items():
      value, grad = jax.value_and_grad(fn)(fixed)
      grad_norm = jnp.sqrt(jnp.sum(jnp.square(grad)))
      effective = jnp.minimum(weight, ratio * l2_norm / (grad_norm + 1e-12))
      surrogate = jnp.sum(jax.lax.stop_gradient(effective * grad) * recon)
      total = total + effective * value + surrogate - jax.lax.stop_gradient(surrogate)
      parts[f"train/{name}"] = value
      parts[f"train/{name}_weight"] = effective
  else:
    for name, (weight, fn) in extra.items():
      value = fn(recon)
      total = total + weight * value
      parts[f"train/{name}"] = value
  parts["train/loss"] = total
  outputs = {"encoder_vectors": aux["encoder_vectors"], "errors": aux["quantization_errors"],
             "counts": quantizer.code_counts(aux["codes"], model.codebook_size), "recon": recon}
  return total, (parts, outputs)


def discriminator_loss_fn(disc: nn.Module, gan_cfg: ml_collections.ConfigDict):
  """(disc_params, real, fake, lecam_ema) -> (loss, parts).

  `fake` is cut from the tokenizer's graph here, so this loss can never
  reach the tokenizer's parameters.
  """
  def loss_fn(disc_params, real, fake, lecam_ema, with_r1=True):
    fake = jax.lax.stop_gradient(fake)
    logits = lambda x: disc.apply({"params": disc_params}, x)
    r1_weight = 0.0
    if gan_cfg.r1_weight > 0 and with_r1:
      # Lazy regularisation: on every r1_every-th step, weighted up to match.
      r1_weight = gan_cfg.r1_weight * gan_cfg.r1_every
      r1, real_logits = r1_penalty(logits, real)
    else:
      r1, real_logits = jnp.zeros(()), logits(real)
    fake_logits = logits(fake)
    d_loss = discriminator_loss(real_logits, fake_logits, gan_cfg.loss)
    total = d_loss + 0.5 * r1_weight * r1
    lecam = jnp.zeros(())
    if gan_cfg.lecam_weight > 0:
      lecam = lecam_regularizer(real_logits, fake_logits, lecam_ema[0], lecam_ema[1])
      total = total + gan_cfg.lecam_weight * lecam
    return total, {"train/gan/discriminator_loss": d_loss, "train/gan/r1": r1,
                   "train/gan/lecam": lecam,
                   "train/gan/real_logits": jnp.mean(real_logits),
                   "train/gan/fake_logits": jnp.mean(fake_logits)}
  return loss_fn


GAN_PHASES = ("off", "on", "r1")


def gan_phase(config: ml_collections.ConfigDict, step: int) -> str:
  """What the GAN does in the update from `step` (= state.step, 0-based).

  'off' before gan.start_step (no discriminator work at all), 'r1' on the
  lazy-R1 steps, 'on' otherwise. It is a static argument of the step: XLA:CPU
  runs convolutions inside lax.cond about 3x slower, so each phase is
  compiled as its own straight-line program instead.
  """
  if not uses_gan(config) or step < config.gan.start_step:
    return "off"
  # R1 on the GAN's first step (D is regularised from the start), then every k-th.
  if config.gan.r1_weight > 0 and (step - config.gan.start_step) % config.gan.r1_every == 0:
    return "r1"
  return "on"


def perceptual_on(config: ml_collections.ConfigDict, step: int) -> bool:
  """Whether LPIPS / I3D are in the update from `step` (static, like the GAN phase)."""
  return step >= config.loss.perceptual_start_step
