"""Trains the C-ViViT tokenizer: a linear trainer, top to bottom.

Setup -> Mesh -> Input -> Model & optimizer (eval_shape) -> Shardings -> Restore
or Init -> Update step -> Evals -> Loop. The same code runs on one CPU device,
8 simulated devices, or a pod slice; only config.mesh and the rules change.
"""
from __future__ import annotations

import json
import os
import signal
import threading
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from phenaki_jax import batch_log, checkpointing, ema, losses, metrics, optimizers
from phenaki_jax.config import schema
from phenaki_jax.pretrained import perceptual
from phenaki_jax import perf
from phenaki_jax import sharding
from phenaki_jax.data import pipeline
from phenaki_jax.eval import recon as recon_eval
from phenaki_jax.models import cvivit, discriminator, quantizer
from phenaki_jax.train_state import TokenizerState


def build_model(config: ml_collections.ConfigDict) -> cvivit.CViViT:
  return cvivit.from_config(config.model, config.input.resolution)


def uses_gan(config: ml_collections.ConfigDict) -> bool:
  return config.loss.adversarial_weight > 0


def build_discriminator(config: ml_collections.ConfigDict
                        ) -> tuple[discriminator.VideoDiscriminator, optax.GradientTransformation]:
  """The discriminator and its own optimizer (Adam with StyleGAN's β1 = 0)."""
  g = config.gan
  return discriminator.from_config(g), optax.adam(g.learning_rate, b1=g.b1, b2=g.b2)


def load_frozen_networks(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Weights of the pretrained networks the objective uses (none for L2+VQ)."""
  frozen = {}
  if config.loss.lpips_weight > 0:
    frozen["lpips"] = perceptual.lpips_params(config.loss.lpips_net)
  if config.loss.video_perceptual_weight > 0:
    frozen["i3d"] = perceptual.i3d_variables()
  return frozen


def make_init_fn(model: nn.Module, tx: optax.GradientTransformation, num_frames: int,
                 resolution: int, config: ml_collections.ConfigDict | None = None):
  """rng -> TokenizerState with logically boxed leaves (eval_shape it for shardings)."""
  def init(rng: jax.Array) -> TokenizerState:
    model_rng, disc_rng = jax.random.split(rng)
    dummy = jnp.zeros((1, num_frames, resolution, resolution, 3), jnp.float32)
    params = model.init(model_rng, dummy)["params"]
    disc_params, disc_opt_state = {}, {}
    if config is not None and uses_gan(config):
      disc, disc_tx = build_discriminator(config)
      disc_params = disc.init(disc_rng, dummy)["params"]
      disc_opt_state = disc_tx.init(disc_params)
    # Usage starts at zero: on the first step every code no token picked is
    # restarted at an encoder vector, a data-dependent codebook init.
    return TokenizerState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                          code_usage=jnp.zeros((model.codebook_size,), jnp.float32),
                          nonfinite_streak=jnp.zeros((), jnp.int32),
                          ema_params=params, disc_params=disc_params,
                          disc_opt_state=disc_opt_state,
                          lecam_ema=jnp.zeros((2,), jnp.float32))
  return init


def abstract_state_and_shardings(config: ml_collections.ConfigDict, model: nn.Module,
                                 tx: optax.GradientTransformation, mesh: jax.sharding.Mesh):
  """(abstract unboxed state, its NamedShardings, unboxing init fn)."""
  init = make_init_fn(model, tx, config.input.num_frames, config.input.resolution, config)
  abstract_boxed = jax.eval_shape(init, jax.random.key(0))
  shardings = sharding.tree_shardings(abstract_boxed, mesh, config.logical_axis_rules)
  abstract = sharding.strip_boxes(abstract_boxed)
  return abstract, shardings, lambda rng: nn.unbox(init(rng))


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
                   ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Total loss and its logged parts for a float video batch in [-1, 1].

  `adversarial(recon) -> L_adv` is given once the GAN is on. Parts under
  'vq_state/' are not metrics: the step uses them to restart codes, and
  'recon' goes to the discriminator's update.
  """
  recon, aux = model.apply({"params": params}, video)
  l2 = losses.l2_loss(video, recon)
  vq = losses.vq_loss(aux["codebook_loss"], aux["commitment_loss"], loss_cfg.commitment_cost)
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
    l2_grad = jax.grad(lambda r: loss_cfg.l2_weight * losses.l2_loss(video, r))(fixed)
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
  parts["vq_state/encoder_vectors"] = aux["encoder_vectors"]
  parts["vq_state/errors"] = aux["quantization_errors"]
  parts["vq_state/counts"] = quantizer.code_counts(aux["codes"], model.codebook_size)
  parts["recon"] = recon
  return total, parts


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
      r1, real_logits = losses.r1_penalty(logits, real)
    else:
      r1, real_logits = jnp.zeros(()), logits(real)
    fake_logits = logits(fake)
    d_loss = losses.discriminator_loss(real_logits, fake_logits, gan_cfg.loss)
    total = d_loss + 0.5 * r1_weight * r1
    lecam = jnp.zeros(())
    if gan_cfg.lecam_weight > 0:
      lecam = losses.lecam_regularizer(real_logits, fake_logits, lecam_ema[0], lecam_ema[1])
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


def make_train_step(model: nn.Module, tx: optax.GradientTransformation,
                    config: ml_collections.ConfigDict):
  """(state, batch, frozen=None, phase='off', perceptual=True) -> (state, metrics).

  Jit `phase` and `perceptual` as static arguments (see gan_phase, perceptual_on).
  """
  schedule = optimizers.learning_rate_schedule(config.optimizer, config.total_steps)
  gan = uses_gan(config)
  if gan:
    disc, disc_tx = build_discriminator(config)
    disc_loss_fn = discriminator_loss_fn(disc, config.gan)

  def train_step(state: TokenizerState, batch: dict[str, jax.Array],
                 frozen: dict[str, Any] | None = None, phase: str = "off",
                 perceptual: bool = True):
    if phase not in GAN_PHASES:
      raise ValueError(f"GAN phase {phase!r}: expected one of {GAN_PHASES}")
    video = pipeline.to_model_input(batch["frames"])
    # The rngs depend only on the step, so a resumed run repeats them.
    step_rng = jax.random.fold_in(jax.random.key(config.seed), state.step)
    restart_rng, perceptual_rng = jax.random.split(step_rng)
    gan_on = gan and phase != "off"

    adversarial = None
    if gan_on:
      def adversarial(recon):
        return losses.generator_adversarial_loss(
            disc.apply({"params": state.disc_params}, recon), config.gan.loss)

    loss_cfg = config.loss
    if not perceptual:
      loss_cfg = ml_collections.ConfigDict(config.loss.to_dict())
      loss_cfg.lpips_weight = loss_cfg.video_perceptual_weight = 0.0
    grad_fn = jax.value_and_grad(
        lambda p: compute_losses(model, p, video, loss_cfg, frozen=frozen,
                                 rng=perceptual_rng, adversarial=adversarial), has_aux=True)
    (_, parts), grads = grad_fn(state.params)
    recon = parts.pop("recon")
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    vectors, counts = parts.pop("vq_state/encoder_vectors"), parts.pop("vq_state/counts")
    errors = parts.pop("vq_state/errors")
    usage = state.code_usage
    restarted_rows = None
    if config.codebook.restart_dead_codes:
      old_codebook = params["quantizer"]["codebook"]
      codebook, usage, restarted = quantizer.restart_dead_codes(
          old_codebook, usage, vectors, counts, restart_rng,
          decay=config.codebook.usage_decay, dead_fraction=config.codebook.dead_fraction,
          errors=errors)
      restarted_rows = jnp.any(codebook != old_codebook, axis=-1)
      params = {**params, "quantizer": {**params["quantizer"], "codebook": codebook}}
      parts["train/vq/restarted_codes"] = restarted

    disc_params, disc_opt_state, lecam_ema = (state.disc_params, state.disc_opt_state,
                                              state.lecam_ema)
    if gan_on:
      # D's update uses the reconstructions of the params before this step's
      # tokenizer update, as constants; the tokenizer's update above used D's
      # params before D's update.
      (_, d_parts), d_grads = jax.value_and_grad(disc_loss_fn, has_aux=True)(
          disc_params, video, recon, lecam_ema, phase == "r1")
      d_updates, disc_opt_state = disc_tx.update(d_grads, disc_opt_state, disc_params)
      disc_params = optax.apply_updates(disc_params, d_updates)
      decay = config.gan.lecam_decay
      means = jnp.stack([d_parts["train/gan/real_logits"], d_parts["train/gan/fake_logits"]])
      lecam_ema = decay * lecam_ema + (1.0 - decay) * means
      d_parts["train/gan/discriminator_grad_norm"] = optax.global_norm(d_grads)
      parts.update(d_parts)
    if gan:
      parts["train/gan/active"] = jnp.float32(gan_on)

    ema_params = _updated_ema(state.ema_params, params, state.step, config.ema_decay,
                              restarted_rows)
    grad_norm = optax.global_norm(grads)
    # A NaN/Inf loss, gradient or update skips the step: every parameter,
    # optimizer state and statistic stays as it was, so nothing non-finite
    # is ever trained on or checkpointed.
    finite = (jnp.isfinite(parts["train/loss"]) & jnp.isfinite(grad_norm)
              & jnp.isfinite(optax.global_norm(params)))
    if gan_on:
      finite = finite & jnp.isfinite(optax.global_norm(disc_params))
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    parts["train/grad_norm"] = grad_norm
    parts["train/learning_rate"] = schedule(state.step)
    parts["train/nonfinite_step_fraction"] = 1.0 - finite.astype(jnp.float32)
    new_streak = jnp.where(finite, 0, state.nonfinite_streak + 1)
    parts["nonfinite_streak"] = new_streak
    new_state = TokenizerState(
        step=state.step + 1,
        params=keep(params, state.params),
        opt_state=keep(opt_state, state.opt_state),
        code_usage=keep(usage, state.code_usage),
        nonfinite_streak=new_streak,
        ema_params=keep(ema_params, state.ema_params),
        disc_params=keep(disc_params, state.disc_params),
        disc_opt_state=keep(disc_opt_state, state.disc_opt_state),
        lecam_ema=keep(lecam_ema, state.lecam_ema))
    return new_state, parts

  return train_step


def _updated_ema(ema_params: Any, params: Any, step: jax.Array, decay: float,
                 restarted_rows: jax.Array | None) -> Any:
  if decay == 0:
    return params
  new = ema.update(ema_params, params, step, decay)
  if restarted_rows is not None:
    # A restarted code is a new vector: averaging it with the dead one it
    # replaced would give a code no encoder output is near.
    codebook = params["quantizer"]["codebook"]
    ema_codebook = jnp.where(restarted_rows[:, None], codebook, new["quantizer"]["codebook"])
    new = {**new, "quantizer": {**new["quantizer"], "codebook": ema_codebook}}
  return new


def make_reconstruct_fn(model: nn.Module):
  """(params, frames in [-1, 1]) -> (reconstruction clipped to [-1, 1], codes)."""
  def reconstruct(params: Any, video: jax.Array):
    recon, aux = model.apply({"params": params}, video)
    return jnp.clip(recon, -1, 1), aux["codes"]
  return reconstruct


def restore_or_set_aside(ckpt: checkpointing.Checkpointer, target: Any, data_iterator: Any,
                         config: ml_collections.ConfigDict) -> tuple[Any, int] | None:
  """The newest checkpoint that restores; with none usable, set them aside only if allowed."""
  try:
    return ckpt.restore_latest(target, data_iterator, config)
  except checkpointing.NoUsableCheckpointError:
    if not config.fresh_start_if_checkpoints_unusable:
      raise
    where = ckpt.set_aside()
    logging.warning("no checkpoint restored; as config.fresh_start_if_checkpoints_unusable "
                    "asks, they were moved to %s and training starts from scratch", where)
    return None


class NonFiniteTrainingError(RuntimeError):
  """Too many consecutive steps had a NaN/Inf loss, gradient or update."""


def check_nonfinite_streak(streak: int, step: int, limit: int, last_saved: int | None) -> None:
  if limit > 0 and streak >= limit:
    raise NonFiniteTrainingError(
        f"{streak} consecutive steps up to step {step} had a non-finite loss, gradient or "
        f"update (config.max_consecutive_nonfinite={limit}); they were skipped and nothing "
        f"non-finite was saved (newest checkpoint: step {last_saved}). Check the input data "
        "and the learning rate, then resume from that checkpoint.")


def save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      json.dump(config.to_dict(), f, indent=2, sort_keys=True)


class PreemptionWatch:
  """Turns SIGTERM (and orbax's multi-host preemption notice) into a clean stop.

  With one process a SIGTERM sets a flag checked after every step. With
  several processes all must stop at the same step, so the decision comes
  from orbax/JAX's preemption sync point instead.
  """

  def __init__(self, ckpt: checkpointing.Checkpointer):
    self._ckpt = ckpt
    self._requested = False
    self._previous = None
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

  def _on_sigterm(self, signum, frame):  # pylint: disable=unused-argument
    logging.warning("SIGTERM received: saving a checkpoint after the current step")
    self._requested = True

  def reached(self, step: int) -> bool:
    if jax.process_count() > 1:
      return self._ckpt.reached_preemption(step)
    return self._requested

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       stop_after_step: int | None = None) -> dict[str, Any]:
  """Trains until config.total_steps, resuming from workdir's checkpoints.

  `stop_after_step` ends this run early with a checkpoint, as a preemption
  would, without changing anything that depends on total_steps.
  """
  # --- Setup: a bad config fails here, before anything compiles.
  config = schema.complete(config)
  schema.validate_cvivit(config, jax.device_count(), jax.process_count())
  perf.setup_compilation_cache(config.model.compilation_cache_dir)
  os.makedirs(workdir, exist_ok=True)
  save_config(config, workdir)
  writer = metrics.create_writer(workdir)
  rules = config.logical_axis_rules

  # --- Mesh.
  mesh = sharding.make_mesh(config.mesh.shape)
  logging.info("mesh %s over %d devices (%d processes)", dict(mesh.shape), jax.device_count(),
               jax.process_count())
  batch_sharding = sharding.batch_sharding(mesh, rules)
  replicated = sharding.replicated(mesh)

  # --- Input.
  train_iter = iter(pipeline.make_train_dataset(
      config.input, seed=config.seed, process_index=jax.process_index(),
      process_count=jax.process_count()))

  with sharding.use_mesh(mesh, rules):
    # --- Model & optimizer, shapes only.
    model = build_model(config)
    tx = optimizers.make_optimizer(config.optimizer, config.total_steps)
    abstract_state, state_shardings, init_fn = abstract_state_and_shardings(config, model, tx, mesh)
    num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_state.params))
    logging.info("C-ViViT with %.2fM parameters", num_params / 1e6)

    # --- Restore, or initialise already sharded.
    ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"),
                                      max_to_keep=config.keep_checkpoints,
                                      async_save=config.async_checkpointing)
    restored = restore_or_set_aside(ckpt, checkpointing.abstract_with_shardings(
        abstract_state, state_shardings), train_iter, config)
    if restored is None:
      state = jax.jit(init_fn, out_shardings=state_shardings)(jax.random.key(config.seed))
      start_step = 0
      logging.info("no checkpoint in %s: starting from scratch", workdir)
    else:
      state, start_step = restored
      logging.info("resumed from step %d", start_step)

    # --- Update step: one jitted function, explicit shardings, state donated.
    # Pretrained LPIPS / I3D weights: step arguments, replicated, never trained.
    frozen = jax.device_put(load_frozen_networks(config), replicated)
    train_step = jax.jit(make_train_step(model, tx, config),
                         in_shardings=(state_shardings, batch_sharding, replicated),
                         out_shardings=(state_shardings, replicated), donate_argnums=(0,),
                         static_argnums=(3, 4))
    reconstruct = jax.jit(make_reconstruct_fn(model),
                          in_shardings=(state_shardings.ema_params, replicated),
                          out_shardings=(replicated, replicated))
    evaluator = None
    if config.eval_every_steps > 0:
      clips = pipeline.eval_videos(config.input, seed=config.seed,
                                   count=config.eval_protocol.num_clips)
      evaluator = recon_eval.ReconstructionEvaluator(
          clips, config.eval_protocol, codebook_size=model.codebook_size,
          lpips_params=frozen.get("lpips") if (config.eval_protocol.lpips_net
                                               == config.loss.lpips_net) else None,
          source={"data": config.input.data, "seed": config.seed, "held_out": True},
          config_prefix="eval_protocol.")

    def run_eval(step: int) -> dict[str, float]:
      result = evaluator(lambda frames: reconstruct(state.ema_params, frames))
      scalars = {f"eval/{k}": float(v) for k, v in result.metrics.items()}
      writer.write_scalars(step, scalars)
      if jax.process_index() == 0:
        n = config.num_eval_examples
        grid = metrics.reconstruction_grid(evaluator.clips[:n] / 127.5 - 1.0,
                                           result.reconstructions[:n] / 127.5 - 1.0)
        writer.write_images(step, {"eval/reconstructions": grid[None]})
        metrics.save_png(os.path.join(workdir, "reconstructions", f"step_{step:07d}.png"), grid,
                         upscale=max(1, 128 // config.input.resolution))
      logging.info("eval (EMA weights) at step %d: %s", step,
                   " ".join(f"{k}={v:.4g}" for k, v in scalars.items()))
      return scalars

    # --- Loop.
    progress = metrics.ProgressLogger(config.total_steps, start_step)
    accumulator = metrics.StepAccumulator()
    preemption = PreemptionWatch(ckpt)
    pending_streak = None
    last_saved = start_step if restored is not None else None
    last_scalars: dict[str, float] = {}
    eval_scalars: dict[str, float] = {}
    hashes = batch_log.BatchHashLog(workdir, start_step)
    for step in range(start_step + 1, config.total_steps + 1):
      local = next(train_iter)
      kind = "video" if local["frames"].shape[1] > 1 else "image"
      hashes.add(step, kind, local)
      batch = sharding.host_to_global(local, batch_sharding)
      state, step_metrics = train_step(state, batch, frozen, gan_phase(config, step - 1),
                                       perceptual_on(config, step - 1))
      step_metrics = dict(step_metrics)
      # Checked one step late: by now that value is computed, so no stall.
      if pending_streak is not None:
        check_nonfinite_streak(int(pending_streak), step - 1, config.max_consecutive_nonfinite,
                               last_saved)
      pending_streak = step_metrics.pop("nonfinite_streak")
      # Averaged over the log interval, per kind too: with the 4:1 interleave a
      # single logged step would always be the same kind.
      accumulator.add(kind, step_metrics)
      is_last = step == config.total_steps
      if step % config.log_every_steps == 0 or is_last:
        last_scalars = accumulator.means(per_kind=("train/loss", "train/l2"))
        rate = progress.steps_per_sec(step)
        last_scalars["perf/steps_per_sec"] = rate
        last_scalars["perf/examples_per_sec"] = rate * config.input.batch_size
        writer.write_scalars(step, last_scalars)
        progress.log(step, last_scalars, rate)
        hashes.flush()
      if evaluator is not None and (step % config.eval_every_steps == 0 or is_last):
        eval_scalars = run_eval(step)
      stopping = stop_after_step is not None and step >= stop_after_step
      preempted = preemption.reached(step)
      if step % config.checkpoint_every_steps == 0 or is_last or stopping or preempted:
        if step % config.checkpoint_every_steps == 0 or is_last or preempted:
          check_nonfinite_streak(int(pending_streak), step, config.max_consecutive_nonfinite,
                                 last_saved)
        hashes.flush()
        ckpt.save(step, state, train_iter, config, force=preempted)
        last_saved = step
      if preempted:
        ckpt.wait()
        logging.warning("preempted (SIGTERM) at step %d: checkpoint committed, exiting; run the "
                        "same command again to resume", step)
        break
      if stopping:
        logging.info("stopping after step %d as asked; run again to resume", step)
        break
    preemption.close()
    ckpt.close()
    writer.flush()
  return {"step": int(state.step), "train": last_scalars, "eval": eval_scalars,
          "state": state}
