"""What a checkpoint holds, and how each model's state is built (shapes first, then values).

A train state is a plain pytree: step, parameters, optimizer state and the
statistics a resumed run needs. The builders give the trainers, the memory
pre-flight and the inference loaders (phenaki_jax/tokenizer.py,
phenaki_jax/generator.py) one definition of each state: init functions whose
leaves carry logical axis names, and their abstract shapes with
NamedShardings on a mesh, without allocating anything.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax

from phenaki_jax import checkpointing, sharding
from phenaki_jax.models import cvivit, discriminator, maskgit
from phenaki_jax.text.encoder import TextEncoder


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


@flax.struct.dataclass
class TokenizerState(TrainState):
  # EMA of each code's share of tokens, for restarting dead codes.
  code_usage: jax.Array
  # Consecutive steps whose loss, gradients or update were not finite (and
  # were therefore skipped); kept on device so checking it needs no sync.
  nonfinite_streak: jax.Array
  # Exponential moving average of `params`: what evaluation and export use.
  ema_params: Any
  # The discriminator and its own optimizer ({} when the GAN is off), and
  # the moving averages of its (real, fake) logits for LeCam.
  disc_params: Any
  disc_opt_state: Any
  lecam_ema: jax.Array


@flax.struct.dataclass
class GeneratorState(TrainState):
  # Exponential moving average of `params` (the generator, and the text
  # encoder when it trains): what evaluation and sampling use.
  ema_params: Any
  # Consecutive skipped (non-finite) steps, as in TokenizerState.
  nonfinite_streak: jax.Array


# --- The tokenizer (configs/cvivit.py).

def build_cvivit(config: ml_collections.ConfigDict) -> cvivit.CViViT:
  return cvivit.from_config(config.model, config.input.resolution)


def uses_gan(config: ml_collections.ConfigDict) -> bool:
  return config.loss.adversarial_weight > 0


def build_discriminator(config: ml_collections.ConfigDict
                        ) -> tuple[discriminator.VideoDiscriminator, optax.GradientTransformation]:
  """The discriminator and its own optimizer (Adam with StyleGAN's β1 = 0)."""
  g = config.gan
  return discriminator.from_config(g), optax.adam(g.learning_rate, b1=g.b1, b2=g.b2)


def cvivit_init_fn(model: nn.Module, tx: optax.GradientTransformation,
                   config: ml_collections.ConfigDict):
  """rng -> TokenizerState with logically boxed leaves (eval_shape it for shardings)."""
  def init(rng: jax.Array) -> TokenizerState:
    model_rng, disc_rng = jax.random.split(rng)
    dummy = _dummy_clip(config)
    params = model.init(model_rng, dummy)["params"]
    disc_params, disc_opt_state = {}, {}
    if uses_gan(config):
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


def _dummy_clip(config: ml_collections.ConfigDict) -> jax.Array:
  r = config.input.resolution
  return jnp.zeros((1, config.input.num_frames, r, r, 3), jnp.float32)


def cvivit_abstract_params(config: ml_collections.ConfigDict, model: nn.Module,
                           mesh: jax.sharding.Mesh) -> Any:
  """The tokenizer's parameters only, as ShapeDtypeStructs with their NamedShardings.

  What inference restores (orbax partial restore): no optimizer, no discriminator.
  """
  boxed = jax.eval_shape(model.init, jax.random.key(0), _dummy_clip(config))["params"]
  return _with_shardings(boxed, mesh, config.logical_axis_rules)


def _with_shardings(boxed: Any, mesh: jax.sharding.Mesh, rules: Any) -> Any:
  return checkpointing.abstract_with_shardings(
      sharding.strip_boxes(boxed), sharding.tree_shardings(boxed, mesh, rules))


def _abstract_state(init: Any, mesh: jax.sharding.Mesh, rules: Any):
  """(abstract unboxed state, its NamedShardings, unboxing init fn) of a boxed init fn."""
  abstract_boxed = jax.eval_shape(init, jax.random.key(0))
  shardings = sharding.tree_shardings(abstract_boxed, mesh, rules)
  return sharding.strip_boxes(abstract_boxed), shardings, lambda rng: nn.unbox(init(rng))


def cvivit_abstract_state(config: ml_collections.ConfigDict, model: nn.Module,
                          tx: optax.GradientTransformation, mesh: jax.sharding.Mesh):
  """(abstract unboxed state, its NamedShardings, unboxing init fn)."""
  return _abstract_state(cvivit_init_fn(model, tx, config), mesh, config.logical_axis_rules)


# --- The generator (configs/maskgit.py).

def build_maskgit(config: ml_collections.ConfigDict) -> maskgit.MaskGitTransformer:
  t, h, w = tuple(config.model.token_grid)
  return maskgit.from_config(config.model, codebook_size=config.model.codebook_size,
                             max_token_frames=t, grid_size=(h, w))


def maskgit_init_fn(generator: maskgit.MaskGitTransformer, text: TextEncoder,
                    tx: optax.GradientTransformation, config: ml_collections.ConfigDict):
  """rng -> GeneratorState with logically boxed leaves (eval_shape it for shardings)."""
  def init(rng: jax.Array) -> GeneratorState:
    params = maskgit_params_init_fn(generator, text, config)(rng)
    return GeneratorState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=tx.init(params), ema_params=params,
                          nonfinite_streak=jnp.zeros((), jnp.int32))
  return init


def maskgit_params_init_fn(generator: maskgit.MaskGitTransformer, text: TextEncoder,
                           config: ml_collections.ConfigDict):
  """rng -> {'generator': ..., 'text_encoder': ... when it trains}, logically boxed."""
  t, h, w = tuple(config.model.token_grid)
  length = config.text.max_length

  def init(rng: jax.Array) -> dict[str, Any]:
    gen_rng, text_rng = jax.random.split(rng)
    params = {"generator": generator.init(
        gen_rng, jnp.zeros((1, t, h, w), jnp.int32), jnp.zeros((1, length, text.width)),
        jnp.ones((1, length), jnp.bool_))["params"]}
    if text.trainable:
      ids = jnp.ones((1, length), jnp.int32)
      params["text_encoder"] = text.module.init(text_rng, ids)["params"]
    return params
  return init


def maskgit_abstract_params(config: ml_collections.ConfigDict,
                            generator: maskgit.MaskGitTransformer, text: TextEncoder,
                            mesh: jax.sharding.Mesh) -> Any:
  """The generator's (and a trained text encoder's) parameters only, for inference."""
  boxed = jax.eval_shape(maskgit_params_init_fn(generator, text, config), jax.random.key(0))
  return _with_shardings(boxed, mesh, config.logical_axis_rules)


def maskgit_abstract_state(config: ml_collections.ConfigDict,
                           generator: maskgit.MaskGitTransformer, text: TextEncoder,
                           tx: optax.GradientTransformation, mesh: jax.sharding.Mesh):
  """(abstract unboxed state, its NamedShardings, unboxing init fn)."""
  return _abstract_state(maskgit_init_fn(generator, text, tx, config), mesh,
                         config.logical_axis_rules)
