"""Trains the MaskGIT generator on the tokens of a frozen C-ViViT: a linear trainer.

Setup -> Tokenizer (frozen; checked against the config) -> Text encoder -> Mesh
-> Input -> Model & optimizer (eval_shape) -> Shardings -> Restore or Init ->
Update step -> Evals -> Loop, as in train_cvivit.

One update step, all on device: encode the uint8 clips with the frozen
tokenizer (or take precomputed codes), pad an image batch's single token frame
to the token grid, mask a fraction γ(r) of each example's tokens with
r ~ U(0, 1), replace the text of `text_drop_rate` of the examples by the empty
text (classifier-free guidance), and take the cross-entropy on the masked
tokens only. A generator with long-term memory (model.memory_token_frames)
also gets memory tokens, dropped for memory.drop_rate of the examples (see
train/maskgit_objective.py, with the masking and the story tasks; the
loop pieces shared with the tokenizer's trainer are train/loop.py).

The batch dict (global arrays, leading axis = examples):
  frames        uint8 (B, T, H, W, 3): T = input.num_frames (videos) or 1 (images)
  codes         int32 (B, t, h, w), t <= model.token_grid[0]: precomputed tokens,
                used instead of `frames` when present (the pre-tokenised path)
  token_frames  optional int32 (B,): real token frames per example, for
                batches that mix images and videos; default t for all
  text_ids      int32 (B, L) and text_mask bool (B, L): captions tokenised on the host
  text_embeddings  optional float (B, L, D): precomputed outputs of a frozen
                text encoder, used instead of text_ids (with text_mask)
  memory_frames optional uint8 (B, 1 + (m−1)·t_p, H, W, 3): a story clip's
                object rendered apart from it, encoded into its memory tokens
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from phenaki_jax import (checkpointing, distributed, ema, metrics, optimizers, perf, sharding,
                         storage, train_state)
from phenaki_jax import tokenizer as tokenizer_lib
from phenaki_jax.config import schema
from phenaki_jax.config.schema import ConfigError
from phenaki_jax.data import pipeline, token_shards
from phenaki_jax.models import cvivit, maskgit
from phenaki_jax.text.encoder import TextEncoder, build_text_encoder, tokenize_captions
from phenaki_jax.tokenizer import Tokenizer
from phenaki_jax.train import loop as train_loop
from phenaki_jax.train import maskgit_objective as objective
from phenaki_jax.train_state import GeneratorState


# --- Pre-tokenised input (configs/pretokenize.py).

def check_token_shards(config: ml_collections.ConfigDict, tok: Tokenizer,
                       text: TextEncoder) -> None:
  """The shards must hold this tokenizer's codes, and embeddings of this text encoder."""
  where = config.input.token_shards
  meta = token_shards.read_metadata(where)
  made_by, errors = meta["tokenizer"], []
  if made_by["workdir"] != tokenizer_lib.absolute(config.tokenizer.workdir) or made_by["step"] != tok.step:
    errors.append(f"they hold the codes of tokenizer {made_by['workdir']} step {made_by['step']}"
                  f", but config.tokenizer.workdir={config.tokenizer.workdir!r} loaded step "
                  f"{tok.step}; set config.tokenizer.workdir / config.tokenizer.step to match")
  for split, info in meta["splits"].items():
    if split == "video" and tuple(info["token_grid"]) != tuple(config.model.token_grid):
      errors.append(f"their video token grid is {tuple(info['token_grid'])}, "
                    f"config.model.token_grid={tuple(config.model.token_grid)}")
  cached = meta["text"]
  if cached.get("cached"):
    wanted = {"text.encoder": ("t5", config.text.encoder),
              "text.frozen": (True, bool(config.text.frozen)),
              "text.t5_path": (cached["t5_path"], tokenizer_lib.absolute(config.text.t5_path) if config.text.t5_path else ""),
              "text.max_length": (cached["max_length"], config.text.max_length)}
    for key, (theirs, ours) in wanted.items():
      if theirs != ours:
        errors.append(f"their text embeddings were made with {key}={theirs!r}, the config "
                      f"has {ours!r}")
    if cached["width"] != text.width:
      errors.append(f"their text embeddings are {cached['width']} wide, the encoder makes "
                    f"{text.width}")
  if errors:
    raise ConfigError(f"config.input.token_shards={where!r} do not fit this run: "
                      + "; ".join(errors))
  logging.info("pre-tokenised input %s: %s; text embeddings %s", where,
               {k: v["records"] for k, v in meta["splits"].items()},
               "cached" if cached.get("cached") else "computed from captions")


def held_out_batch(config: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
  """The eval examples (clips + captions, or their pre-tokenised records), logged as
  held out or as training clips (pipeline.eval_source)."""
  n = config.num_eval_examples
  clips_from, _ = pipeline.eval_source(config.input)
  logging.info("eval examples: %s", clips_from)
  if config.input.data != "tokens":
    frames, captions = pipeline.eval_clips(config.input, seed=config.seed, count=n,
                                           key="config.num_eval_examples")
    return {"frames": frames, "caption": np.asarray(captions)}
  where = config.input.token_shards
  split = "eval" if storage.isdir(storage.join(where, "eval")) else "video"
  source = token_shards.TokenShardSource(where, split, config.text.max_length)
  if len(source) < n:
    raise ConfigError(f"config.num_eval_examples={n}: {where}/{split} holds {len(source)}")
  examples = [source[i] for i in range(n)]
  batch = {"codes": np.stack([e["codes"] for e in examples])}
  if "text_embeddings" in examples[0]:
    batch["text_embeddings"] = np.stack([e["text_embeddings"] for e in examples])
    batch["text_mask"] = np.stack([e["text_mask"] for e in examples])
  else:
    batch["caption"] = np.asarray([e["caption"] for e in examples])
  return batch


# --- The step's frozen inputs.

def frozen_inputs(tok: Tokenizer, text: TextEncoder, config: ml_collections.ConfigDict,
                  mesh: jax.sharding.Mesh) -> tuple[dict[str, Any], dict[str, Any]]:
  """The step's frozen inputs (tokenizer params, frozen text encoder) and their shardings.

  The tokenizer is replicated: its encoder is small next to the generator,
  and its head / width sizes then need not divide the generator's mesh.
  """
  tok_params = jax.device_get(tok.params)
  _, shardings = frozen_input_specs(tok_params, text, config, mesh)
  values = {"tokenizer": tok_params, "text_encoder": {}}
  if not text.trainable:
    values["text_encoder"] = text.pretrained
  return sharding.place(values, shardings), shardings


def frozen_input_specs(tok_params: Any, text: TextEncoder, config: ml_collections.ConfigDict,
                       mesh: jax.sharding.Mesh) -> tuple[dict[str, Any], dict[str, Any]]:
  """(abstract shapes of the frozen text encoder's params, the frozen inputs' shardings).

  `tok_params` may be values or ShapeDtypeStructs: only its structure is
  used. Shapes only, so the memory pre-flight (phenaki_jax/preflight.py)
  compiles the same step without loading any weights.
  """
  shardings = {"tokenizer": jax.tree.map(lambda _: sharding.replicated(mesh), tok_params),
               "text_encoder": {}}
  text_shapes = {}
  if not text.trainable:
    boxed = jax.eval_shape(text.module.init, jax.random.key(0),
                           jnp.ones((1, config.text.max_length), jnp.int32))["params"]
    shardings["text_encoder"] = sharding.tree_shardings(boxed, mesh, config.logical_axis_rules)
    text_shapes = sharding.strip_boxes(boxed)
  return text_shapes, shardings


# --- Steps.

def make_train_step(generator: maskgit.MaskGitTransformer, text: TextEncoder,
                    tokenizer_model: cvivit.CViViT, tx: optax.GradientTransformation,
                    config: ml_collections.ConfigDict):
  schedule = optimizers.learning_rate_schedule(config.optimizer, config.total_steps)

  def train_step(state: GeneratorState, batch: dict[str, jax.Array], frozen: dict[str, Any]):
    codes = objective.batch_codes(tokenizer_model, frozen["tokenizer"], batch)
    if "prefix_frames" in batch:  # story clips: K context frames -> token frames
      tp = tokenizer_model.temporal_patch_size
      batch = {**batch, "prefix_token_frames": 1 + (batch["prefix_frames"] - 1) // tp}
    if "memory_frames" in batch and generator.memory_token_frames:
      # Story clips: their object rendered apart -> memory tokens.
      batch = {**batch, "memory_codes": objective.batch_codes(tokenizer_model, frozen["tokenizer"],
                                                    {"frames": batch["memory_frames"]})}
    rng = train_loop.step_rng(config.seed, state.step)
    loss_fn = lambda p: objective.compute_losses(
        generator, text, p, frozen["text_encoder"], batch, codes, rng,
        text_drop_rate=config.text_drop_rate, label_smoothing=config.loss.label_smoothing,
        schedule=config.mask_schedule, prefix_probability=config.prefix.probability,
        prefix_corrupt_fraction=config.prefix.corrupt_fraction,
        memory_drop_rate=config.memory.drop_rate)
    (_, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema_params = ema.update(state.ema_params, params, state.step, config.ema_decay)
    finite, grad_norm = train_loop.finite_update(parts["train/loss"], grads, params)
    keep = lambda new, old: train_loop.keep_if(finite, new, old)
    new_streak = jnp.where(finite, 0, state.nonfinite_streak + 1)
    parts.update(train_loop.nonfinite_metrics(finite, grad_norm, schedule(state.step)))
    new_state = GeneratorState(
        step=state.step + 1,
        params=keep(params, state.params),
        opt_state=keep(opt_state, state.opt_state),
        ema_params=keep(ema_params, state.ema_params),
        nonfinite_streak=new_streak)
    return new_state, parts, new_streak

  return train_step


def make_eval_step(generator: maskgit.MaskGitTransformer, text: TextEncoder,
                   tokenizer_model: cvivit.CViViT, config: ml_collections.ConfigDict):
  """Held-out masked-token loss; the masks are the same at every eval."""
  def eval_step(params: Any, frozen: dict[str, Any], batch: dict[str, jax.Array],
                text_drop_rate: jax.Array):
    codes = objective.batch_codes(tokenizer_model, frozen["tokenizer"], batch)
    _, parts = objective.compute_losses(
        generator, text, params, frozen["text_encoder"], batch, codes,
        jax.random.key(config.seed + 1), text_drop_rate=text_drop_rate, label_smoothing=0.0,
        schedule=config.mask_schedule)
    return {"loss": parts["train/loss"], "masked_accuracy": parts["train/masked_accuracy"]}
  return eval_step


def _batch_kind(batch: Mapping[str, Any]) -> str:
  if "prefix_frames" in batch:
    return "story"
  frames = batch["codes"] if "codes" in batch else batch["frames"]
  return "video" if frames.shape[1] > 1 else "image"


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       stop_after_step: int | None = None) -> dict[str, Any]:
  """Trains until config.total_steps, resuming from workdir's checkpoints.

  `stop_after_step` ends this run early with a checkpoint, as a preemption
  would, without changing anything that depends on total_steps.
  """
  # --- Setup: a bad config fails here, before anything loads or compiles.
  config = schema.complete(config)
  schema.validate_maskgit(config, jax.device_count(), jax.process_count())
  perf.setup_compilation_cache(config.model.compilation_cache_dir)
  storage.check_writable_root(workdir, "--workdir")
  rules = config.logical_axis_rules

  # --- The frozen tokenizer, checked against the config and recorded in the
  # workdir (process 0 chooses its step, every process loads that one); the text encoder.
  tok = tokenizer_lib.load_for_generator(config, workdir)
  text = build_text_encoder(config.text)
  if config.input.data == "tokens":
    check_token_shards(config, tok, text)
  train_loop.save_config(config, workdir)
  writer = metrics.create_writer(workdir)

  # --- Mesh.
  mesh = sharding.make_mesh(config.mesh.shape)
  logging.info("mesh %s over %d devices (%d processes)", dict(mesh.shape), jax.device_count(),
               jax.process_count())
  batch_sharding = sharding.batch_sharding(mesh, rules)
  replicated = sharding.replicated(mesh)

  # --- Input: clips with captions; captions become ids on the host.
  memory_frames = 0  # story clips carry memory frames of their object for a memory generator
  if config.model.memory_token_frames:
    memory_frames = cvivit.num_frames_of(config.model.memory_token_frames,
                                         int(tok.config.model.temporal_patch_size))
  train_iter = iter(pipeline.make_train_dataset(
      config.input, seed=config.seed, process_index=jax.process_index(),
      process_count=jax.process_count(), keep_caption=True,
      text_max_length=config.text.max_length, story_memory_frames=memory_frames))

  def to_device(local_batch: Mapping[str, Any], where: Any) -> dict[str, jax.Array]:
    host = tokenize_captions(local_batch, text.tokenizer, config.text.max_length)
    return sharding.host_to_global(host, where)

  with sharding.use_mesh(mesh, rules):
    # --- Model & optimizer, shapes only.
    generator = train_state.build_maskgit(config)
    tx = optimizers.make_optimizer(config.optimizer, config.total_steps)
    abstract_state, state_shardings, init_fn = train_state.maskgit_abstract_state(
        config, generator, text, tx, mesh)
    for name, tree in abstract_state.params.items():
      logging.info("%s: %.2fM trained parameters", name,
                   sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree)) / 1e6)
    frozen, frozen_shardings = frozen_inputs(tok, text, config, mesh)

    # --- Restore, or initialise already sharded.
    distributed.wait_for_all("restore")  # after each process's own set-up (see wait_for_all)
    ckpt = checkpointing.Checkpointer(storage.join(workdir, "checkpoints"),
                                      max_to_keep=config.keep_checkpoints,
                                      async_save=config.async_checkpointing)
    restored = train_loop.restore_or_set_aside(ckpt, checkpointing.abstract_with_shardings(
        abstract_state, state_shardings), train_iter, config)
    if restored is None:
      state = jax.jit(init_fn, out_shardings=state_shardings)(jax.random.key(config.seed))
      if text.trainable and text.pretrained is not None:
        # A trainable T5 starts from its checkpoint; two copies, as both are donated.
        where = state_shardings.params["text_encoder"]
        state = state.replace(
            params={**state.params, "text_encoder": sharding.place(text.pretrained, where)},
            ema_params={**state.ema_params, "text_encoder": sharding.place(text.pretrained, where)})
      start_step = 0
      logging.info("no checkpoint in %s: starting from scratch", workdir)
    else:
      state, start_step = restored
      logging.info("resumed from step %d", start_step)

    # --- Update step: one jitted function, explicit shardings, state donated.
    train_step = distributed.CompiledTogether(jax.jit(
        make_train_step(generator, text, tok.model, tx, config),
        in_shardings=(state_shardings, batch_sharding, frozen_shardings),
        out_shardings=(state_shardings, replicated, replicated),
        donate_argnums=(0,)), "generator_train_step")
    eval_step = distributed.CompiledTogether(jax.jit(
        make_eval_step(generator, text, tok.model, config),
        in_shardings=(state_shardings.params, frozen_shardings, replicated, replicated),
        out_shardings=replicated), "generator_eval_step")
    eval_batch = None
    if config.eval_every_steps > 0:
      eval_batch = to_device(held_out_batch(config), replicated)

    def run_eval(step: int) -> dict[str, float]:
      scalars = {}
      for name, params, drop in (("eval", state.params, 0.0), ("eval/ema", state.ema_params, 0.0),
                                 ("eval/no_text", state.params, 1.0)):
        out = jax.device_get(eval_step(params, frozen, eval_batch, jnp.float32(drop)))
        scalars.update({f"{name}/{k}": float(v) for k, v in out.items()})
      writer.write_scalars(step, scalars)
      logging.info("eval at step %d: %s", step,
                   " ".join(f"{k}={v:.4g}" for k, v in scalars.items()))
      return scalars

    # --- Loop.
    with train_loop.TrainLoop(config, workdir, ckpt, writer, train_iter, start_step=start_step,
                              resumed=restored is not None,
                              per_kind=("train/loss", "train/masked_accuracy"),
                              finish_scalars=objective.finish_bucket_metrics,
                              stop_after_step=stop_after_step) as loop:
      for step in loop.steps():
        local = next(train_iter)
        kind = _batch_kind(local)
        loop.record_batch(step, kind, local)
        state, step_metrics, streak = train_step(state, to_device(local, batch_sharding), frozen)
        if loop.end_step(step, kind, state, step_metrics, streak,
                         run_eval if eval_batch is not None else None):
          break
  return {"step": int(state.step), "train": loop.last_scalars, "eval": loop.eval_scalars,
          "state": state}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """The job main.py dispatches to: train_and_evaluate until config.total_steps."""
  return train_and_evaluate(config, workdir)
