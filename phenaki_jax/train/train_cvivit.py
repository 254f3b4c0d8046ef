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

from phenaki_jax import checkpointing, config_schema, losses, metrics, optimizers, sharding
from phenaki_jax.data import pipeline
from phenaki_jax.models import cvivit
from phenaki_jax.models import quantizer
from phenaki_jax.train.state import TokenizerState


def build_model(config: ml_collections.ConfigDict) -> cvivit.CViViT:
  return cvivit.from_config(config.model, config.input.resolution)


def make_init_fn(model: nn.Module, tx: optax.GradientTransformation, num_frames: int,
                 resolution: int):
  """rng -> TokenizerState with logically boxed leaves (eval_shape it for shardings)."""
  def init(rng: jax.Array) -> TokenizerState:
    dummy = jnp.zeros((1, num_frames, resolution, resolution, 3), jnp.float32)
    params = model.init(rng, dummy)["params"]
    # Usage starts at zero: on the first step every code no token picked is
    # restarted at an encoder vector, a data-dependent codebook init.
    return TokenizerState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                          code_usage=jnp.zeros((model.codebook_size,), jnp.float32),
                          nonfinite_streak=jnp.zeros((), jnp.int32))
  return init


def abstract_state_and_shardings(config: ml_collections.ConfigDict, model: nn.Module,
                                 tx: optax.GradientTransformation, mesh: jax.sharding.Mesh):
  """(abstract unboxed state, its NamedShardings, unboxing init fn)."""
  init = make_init_fn(model, tx, config.input.num_frames, config.input.resolution)
  abstract_boxed = jax.eval_shape(init, jax.random.key(0))
  shardings = sharding.tree_shardings(abstract_boxed, mesh, config.logical_axis_rules)
  abstract = sharding.strip_boxes(abstract_boxed)
  return abstract, shardings, lambda rng: nn.unbox(init(rng))


def compute_losses(model: nn.Module, params: Any, video: jax.Array,
                   loss_cfg: ml_collections.ConfigDict) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Total loss and its logged parts for a float video batch in [-1, 1].

  Parts under 'vq_state/' are not metrics: the step uses them to restart codes.
  """
  recon, aux = model.apply({"params": params}, video)
  l2 = losses.l2_loss(video, recon)
  vq = losses.vq_loss(aux["codebook_loss"], aux["commitment_loss"], loss_cfg.commitment_cost)
  total = loss_cfg.l2_weight * l2 + loss_cfg.vq_weight * vq
  parts = {
      "train/loss": total,
      "train/l2": l2,
      "train/vq/loss": vq,
      "train/vq/codebook_loss": aux["codebook_loss"],
      "train/vq/commitment_loss": aux["commitment_loss"],
      "train/vq/usage": aux["usage"],
      "train/vq/perplexity": aux["perplexity"],
      "vq_state/encoder_vectors": aux["encoder_vectors"],
      "vq_state/errors": aux["quantization_errors"],
      "vq_state/counts": quantizer.code_counts(aux["codes"], model.codebook_size),
  }
  return total, parts


def make_train_step(model: nn.Module, tx: optax.GradientTransformation,
                    config: ml_collections.ConfigDict):
  schedule = optimizers.learning_rate_schedule(config.optimizer, config.total_steps)

  def train_step(state: TokenizerState, batch: dict[str, jax.Array]):
    video = pipeline.to_model_input(batch["frames"])
    grad_fn = jax.value_and_grad(
        lambda p: compute_losses(model, p, video, config.loss), has_aux=True)
    (_, parts), grads = grad_fn(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    vectors, counts = parts.pop("vq_state/encoder_vectors"), parts.pop("vq_state/counts")
    errors = parts.pop("vq_state/errors")
    usage = state.code_usage
    if config.codebook.restart_dead_codes:
      # The rng depends only on the step, so a resumed run restarts the same codes.
      rng = jax.random.fold_in(jax.random.key(config.seed), state.step)
      codebook, usage, restarted = quantizer.restart_dead_codes(
          params["quantizer"]["codebook"], usage, vectors, counts, rng,
          decay=config.codebook.usage_decay, dead_fraction=config.codebook.dead_fraction,
          errors=errors)
      params = {**params, "quantizer": {**params["quantizer"], "codebook": codebook}}
      parts["train/vq/restarted_codes"] = restarted
    grad_norm = optax.global_norm(grads)
    # A NaN/Inf loss, gradient or update skips the step: params, optimizer
    # state and code usage stay as they were, so nothing non-finite is ever
    # trained on or checkpointed.
    finite = (jnp.isfinite(parts["train/loss"]) & jnp.isfinite(grad_norm)
              & jnp.isfinite(optax.global_norm(params)))
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
        nonfinite_streak=new_streak)
    return new_state, parts

  return train_step


def make_eval_step(model: nn.Module):
  def eval_step(params: Any, frames: jax.Array):
    video = pipeline.to_model_input(frames)
    recon, aux = model.apply({"params": params}, video)
    return jnp.clip(recon, -1, 1), {
        "eval/psnr": losses.psnr(video, recon),
        "eval/l2": losses.l2_loss(video, recon),
        "eval/vq/usage": aux["usage"],
        "eval/vq/perplexity": aux["perplexity"],
    }
  return eval_step


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
  config = config_schema.complete(config)
  config_schema.validate_cvivit(config, jax.device_count(), jax.process_count())
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
    restored = ckpt.restore_latest(
        checkpointing.abstract_with_shardings(abstract_state, state_shardings), train_iter)
    if restored is None:
      state = jax.jit(init_fn, out_shardings=state_shardings)(jax.random.key(config.seed))
      start_step = 0
      logging.info("no checkpoint in %s: starting from scratch", workdir)
    else:
      state, start_step = restored
      logging.info("resumed from step %d", start_step)

    # --- Update step: one jitted function, explicit shardings, state donated.
    train_step = jax.jit(make_train_step(model, tx, config),
                         in_shardings=(state_shardings, batch_sharding),
                         out_shardings=(state_shardings, replicated), donate_argnums=(0,))
    eval_step = jax.jit(make_eval_step(model),
                        in_shardings=(state_shardings.params, replicated),
                        out_shardings=(replicated, replicated))
    eval_frames = None
    if config.eval_every_steps > 0:
      eval_frames = pipeline.eval_videos(config.input, seed=config.seed,
                                         count=config.num_eval_examples)

    def run_eval(step: int) -> dict[str, float]:
      recon, scalars = eval_step(state.params, jax.device_put(eval_frames, replicated))
      scalars = {k: float(v) for k, v in jax.device_get(scalars).items()}
      writer.write_scalars(step, scalars)
      if jax.process_index() == 0:
        grid = metrics.reconstruction_grid(eval_frames / 127.5 - 1.0, np.asarray(recon))
        writer.write_images(step, {"eval/reconstructions": grid[None]})
        metrics.save_png(os.path.join(workdir, "reconstructions", f"step_{step:07d}.png"), grid,
                         upscale=max(1, 128 // config.input.resolution))
      logging.info("eval at step %d: %s", step, " ".join(f"{k}={v:.4g}" for k, v in scalars.items()))
      return scalars

    # --- Loop.
    progress = metrics.ProgressLogger(config.total_steps, start_step)
    accumulator = metrics.StepAccumulator()
    preemption = PreemptionWatch(ckpt)
    pending_streak = None
    last_saved = start_step if restored is not None else None
    last_scalars: dict[str, float] = {}
    eval_scalars: dict[str, float] = {}
    for step in range(start_step + 1, config.total_steps + 1):
      batch = sharding.host_to_global(next(train_iter), batch_sharding)
      state, step_metrics = train_step(state, batch)
      step_metrics = dict(step_metrics)
      # Checked one step late: by now that value is computed, so no stall.
      if pending_streak is not None:
        check_nonfinite_streak(int(pending_streak), step - 1, config.max_consecutive_nonfinite,
                               last_saved)
      pending_streak = step_metrics.pop("nonfinite_streak")
      # Averaged over the log interval, per kind too: with the 4:1 interleave a
      # single logged step would always be the same kind.
      accumulator.add("video" if batch["frames"].shape[1] > 1 else "image", step_metrics)
      is_last = step == config.total_steps
      if step % config.log_every_steps == 0 or is_last:
        last_scalars = accumulator.means(per_kind=("train/loss", "train/l2"))
        rate = progress.steps_per_sec(step)
        last_scalars["perf/steps_per_sec"] = rate
        last_scalars["perf/examples_per_sec"] = rate * config.input.batch_size
        writer.write_scalars(step, last_scalars)
        progress.log(step, last_scalars, rate)
      if eval_frames is not None and (step % config.eval_every_steps == 0 or is_last):
        eval_scalars = run_eval(step)
      stopping = stop_after_step is not None and step >= stop_after_step
      preempted = preemption.reached(step)
      if step % config.checkpoint_every_steps == 0 or is_last or stopping or preempted:
        if step % config.checkpoint_every_steps == 0 or is_last or preempted:
          check_nonfinite_streak(int(pending_streak), step, config.max_consecutive_nonfinite,
                                 last_saved)
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
