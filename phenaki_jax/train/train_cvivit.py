"""Trains the C-ViViT tokenizer: a linear trainer, top to bottom.

Setup -> Mesh -> Input -> Model & optimizer (eval_shape) -> Shardings -> Restore
or Init -> Update step -> Evals -> Loop. The same code runs on one CPU device,
8 simulated devices, or a pod slice; only config.mesh and the rules change.
The objective is train/cvivit_objective.py; the loop pieces shared with the
generator's trainer are train/loop.py.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import flax.linen as nn
import optax
from absl import logging

from phenaki_jax import (checkpointing, distributed, ema, metrics, optimizers, perf, sharding,
                         storage, train_state)
from phenaki_jax.config import schema
from phenaki_jax.data import pipeline
from phenaki_jax.eval import recon as recon_eval
from phenaki_jax.models import quantizer
from phenaki_jax.tokenizer import reconstruct_fn
from phenaki_jax.train import cvivit_objective as objective
from phenaki_jax.train import loop as train_loop
from phenaki_jax.train_state import TokenizerState


def make_train_step(model: nn.Module, tx: optax.GradientTransformation,
                    config: ml_collections.ConfigDict):
  """(state, batch, frozen=None, phase='off', perceptual=True) -> (state, metrics, streak).

  `streak`: consecutive skipped (non-finite) steps up to this one. Jit `phase`
  and `perceptual` as static arguments (see cvivit_objective.gan_phase,
  perceptual_on).
  """
  schedule = optimizers.learning_rate_schedule(config.optimizer, config.total_steps)
  gan = train_state.uses_gan(config)
  if gan:
    disc, disc_tx = train_state.build_discriminator(config)
    disc_loss_fn = objective.discriminator_loss_fn(disc, config.gan)

  def train_step(state: TokenizerState, batch: dict[str, jax.Array],
                 frozen: dict[str, Any] | None = None, phase: str = "off",
                 perceptual: bool = True):
    if phase not in objective.GAN_PHASES:
      raise ValueError(f"GAN phase {phase!r}: expected one of {objective.GAN_PHASES}")
    video = pipeline.to_model_input(batch["frames"])
    # The rngs depend only on the step, so a resumed run repeats them.
    restart_rng, perceptual_rng = jax.random.split(train_loop.step_rng(config.seed, state.step))
    gan_on = gan and phase != "off"

    adversarial = None
    if gan_on:
      def adversarial(recon):
        return objective.generator_adversarial_loss(
            disc.apply({"params": state.disc_params}, recon), config.gan.loss)

    loss_cfg = config.loss
    if not perceptual:
      loss_cfg = ml_collections.ConfigDict(config.loss.to_dict())
      loss_cfg.lpips_weight = loss_cfg.video_perceptual_weight = 0.0
    grad_fn = jax.value_and_grad(
        lambda p: objective.compute_losses(model, p, video, loss_cfg, frozen=frozen,
                                           rng=perceptual_rng, adversarial=adversarial),
        has_aux=True)
    (_, (parts, outputs)), grads = grad_fn(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    usage = state.code_usage
    restarted_rows = None
    if config.codebook.restart_dead_codes:
      old_codebook = params["quantizer"]["codebook"]
      codebook, usage, restarted = quantizer.restart_dead_codes(
          old_codebook, usage, outputs["encoder_vectors"], outputs["counts"], restart_rng,
          decay=config.codebook.usage_decay, dead_fraction=config.codebook.dead_fraction,
          errors=outputs["errors"])
      restarted_rows = jnp.any(codebook != old_codebook, axis=-1)
      params = {**params, "quantizer": {**params["quantizer"], "codebook": codebook}}
      opt_state = optimizers.reset_rows(opt_state, ("quantizer", "codebook"), restarted_rows)
      parts["train/vq/restarted_codes"] = restarted

    disc_params, disc_opt_state, lecam_ema = (state.disc_params, state.disc_opt_state,
                                              state.lecam_ema)
    if gan_on:
      # D's update uses the reconstructions of the params before this step's
      # tokenizer update, as constants; the tokenizer's update above used D's
      # params before D's update.
      (_, d_parts), d_grads = jax.value_and_grad(disc_loss_fn, has_aux=True)(
          disc_params, video, outputs["recon"], lecam_ema, phase == "r1")
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
    finite, grad_norm = train_loop.finite_update(
        parts["train/loss"], grads, params, *((disc_params,) if gan_on else ()))
    keep = lambda new, old: train_loop.keep_if(finite, new, old)
    parts.update(train_loop.nonfinite_metrics(finite, grad_norm, schedule(state.step)))
    new_streak = jnp.where(finite, 0, state.nonfinite_streak + 1)
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
    return new_state, parts, new_streak

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
  storage.check_writable_root(workdir, "--workdir")
  train_loop.save_config(config, workdir)
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
    model = train_state.build_cvivit(config)
    tx = optimizers.make_optimizer(config.optimizer, config.total_steps)
    abstract_state, state_shardings, init_fn = train_state.cvivit_abstract_state(
        config, model, tx, mesh)
    num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_state.params))
    logging.info("C-ViViT with %.2fM parameters", num_params / 1e6)

    # --- Restore, or initialise already sharded.
    distributed.wait_for_all("restore")  # after each process's own set-up (see wait_for_all)
    ckpt = checkpointing.Checkpointer(storage.join(workdir, "checkpoints"),
                                      max_to_keep=config.keep_checkpoints,
                                      async_save=config.async_checkpointing)
    restored = train_loop.restore_or_set_aside(ckpt, checkpointing.abstract_with_shardings(
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
    frozen = jax.device_put(objective.load_frozen_networks(config), replicated)
    train_step = distributed.CompiledTogether(jax.jit(
        make_train_step(model, tx, config),
        in_shardings=(state_shardings, batch_sharding, replicated),
        out_shardings=(state_shardings, replicated, replicated),
        donate_argnums=(0,), static_argnums=(3, 4)), "tokenizer_train_step")
    # Evaluation on the training mesh: the evaluator splits each batch of its
    # clips (the same host copy on every process) over the batch axis, as
    # training does; reconstructions stay split for the metrics, which come
    # back replicated, so every process logs the same figures.
    reconstruct = distributed.CompiledTogether(jax.jit(
        reconstruct_fn(model), in_shardings=(state_shardings.ema_params, batch_sharding),
        out_shardings=(batch_sharding, replicated)), "tokenizer_reconstruct")
    evaluator = None
    if config.eval_every_steps > 0:
      clips_from, held_out = pipeline.eval_source(config.input)
      logging.info("evaluation clips: %s", clips_from)
      clips = pipeline.eval_videos(config.input, seed=config.seed,
                                   count=config.eval_protocol.num_clips,
                                   key="config.eval_protocol.num_clips")
      evaluator = recon_eval.ReconstructionEvaluator(
          clips, config.eval_protocol, codebook_size=model.codebook_size, mesh=mesh,
          rules=rules,
          lpips_params=frozen.get("lpips") if (config.eval_protocol.lpips_net
                                               == config.loss.lpips_net) else None,
          source={"data": config.input.data, "seed": config.seed, "clips": clips_from,
                  "held_out": held_out},
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
        metrics.save_png(storage.join(workdir, "reconstructions", f"step_{step:07d}.png"), grid,
                         upscale=max(1, 128 // config.input.resolution))
      logging.info("eval (EMA weights, %s) at step %d: %s",
                   "held out" if held_out else "training clips", step,
                   " ".join(f"{k}={v:.4g}" for k, v in scalars.items()))
      return scalars

    # --- Loop.
    with train_loop.TrainLoop(config, workdir, ckpt, writer, train_iter, start_step=start_step,
                              resumed=restored is not None, per_kind=("train/loss", "train/l2"),
                              stop_after_step=stop_after_step) as loop:
      for step in loop.steps():
        local = next(train_iter)
        kind = "video" if local["frames"].shape[1] > 1 else "image"
        loop.record_batch(step, kind, local)
        batch = sharding.host_to_global(local, batch_sharding)
        state, step_metrics, streak = train_step(state, batch, frozen,
                                                 objective.gan_phase(config, step - 1),
                                                 objective.perceptual_on(config, step - 1))
        if loop.end_step(step, kind, state, step_metrics, streak,
                         run_eval if evaluator is not None else None):
          break
  return {"step": int(state.step), "train": loop.last_scalars, "eval": loop.eval_scalars,
          "state": state}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """The job main.py dispatches to: train_and_evaluate until config.total_steps."""
  return train_and_evaluate(config, workdir)
