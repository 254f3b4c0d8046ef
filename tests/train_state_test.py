"""train_state.py: the inference loaders' abstract params are the train states' params
(structure, shapes, dtypes, shardings), and the GAN's state is there only when it trains.

Everything is abstract (jax.eval_shape): nothing is allocated.
"""
import dataclasses

import jax
import pytest

from phenaki_jax import optimizers, sharding, train_state
from phenaki_jax.config import schema
from phenaki_jax.text.encoder import build_text_encoder
from tests.helpers import load_config


def _mesh():
  # Every axis > 1, so a leaf's PartitionSpec is visible in its sharding.
  return sharding.make_mesh((2, 2, 2))


def _assert_params_match_state(abstract_params, state_params, state_shardings, mesh):
  assert jax.tree.structure(abstract_params) == jax.tree.structure(state_params)
  leaves = jax.tree.leaves(abstract_params)
  assert leaves
  for leaf, want, want_sharding in zip(leaves, jax.tree.leaves(state_params),
                                       jax.tree.leaves(state_shardings)):
    assert isinstance(leaf, jax.ShapeDtypeStruct)
    assert (leaf.shape, leaf.dtype) == (want.shape, want.dtype)
    assert isinstance(leaf.sharding, jax.sharding.NamedSharding)
    assert leaf.sharding.mesh == mesh
    assert leaf.sharding.spec == want_sharding.spec
  # The specs are not all trivial: the logical rules were applied.
  assert any(any(axis is not None for axis in leaf.sharding.spec) for leaf in leaves)


# --- The tokenizer.

@pytest.mark.parametrize("variant", ["tiny", "tiny,l2vq"])
def test_cvivit_abstract_params_are_the_states_params(variant):
  config = schema.complete(load_config("cvivit", variant))
  mesh = _mesh()
  with sharding.use_mesh(mesh, config.logical_axis_rules):
    model = train_state.build_cvivit(config)
    tx = optimizers.make_optimizer(config.optimizer, config.total_steps)
    state, shardings, _ = train_state.cvivit_abstract_state(config, model, tx, mesh)
    params = train_state.cvivit_abstract_params(config, model, mesh)
  assert isinstance(state, train_state.TokenizerState)
  _assert_params_match_state(params, state.params, shardings.params, mesh)
  # The EMA (what inference restores by default) has the same layout.
  _assert_params_match_state(params, state.ema_params, shardings.ema_params, mesh)


def _cvivit_state(variant, **loss):
  config = schema.complete(load_config("cvivit", variant))
  for k, v in loss.items():
    config.loss[k] = v
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  with sharding.use_mesh(mesh, config.logical_axis_rules):
    model = train_state.build_cvivit(config)
    tx = optimizers.make_optimizer(config.optimizer, config.total_steps)
    return config, train_state.cvivit_abstract_state(config, model, tx, mesh)[0]


def test_the_discriminator_is_in_the_state_only_when_the_gan_trains():
  config, state = _cvivit_state("tiny")
  assert config.loss.adversarial_weight > 0 and train_state.uses_gan(config)
  disc, _ = train_state.build_discriminator(config)
  want = jax.eval_shape(disc.init, jax.random.key(0), train_state._dummy_clip(config))["params"]  # pylint: disable=protected-access
  assert jax.tree.structure(state.disc_params) == jax.tree.structure(sharding.strip_boxes(want))
  assert jax.tree.leaves(state.disc_opt_state)
  assert state.lecam_ema.shape == (2,)

  config, state = _cvivit_state("tiny,l2vq")
  assert config.loss.adversarial_weight == 0 and not train_state.uses_gan(config)
  assert state.disc_params == {} and state.disc_opt_state == {}

  # The weight alone decides: the GAN variant with the weight set to 0 has none.
  config, state = _cvivit_state("tiny", adversarial_weight=0.0)
  assert not train_state.uses_gan(config) and state.disc_params == {}


# --- The generator.

@pytest.mark.parametrize("trainable_text", [True, False], ids=["trained_text", "frozen_text"])
def test_maskgit_abstract_params_are_the_states_params(trainable_text):
  config = schema.complete(load_config("maskgit", "tiny"))
  mesh = _mesh()
  text = build_text_encoder(config.text)
  assert text.trainable  # the byte encoder of :tiny
  if not trainable_text:  # as a frozen T5 is: its weights are an input, not state
    text = dataclasses.replace(text, trainable=False)
  with sharding.use_mesh(mesh, config.logical_axis_rules):
    generator = train_state.build_maskgit(config)
    tx = optimizers.make_optimizer(config.optimizer, config.total_steps)
    state, shardings, _ = train_state.maskgit_abstract_state(config, generator, text, tx, mesh)
    params = train_state.maskgit_abstract_params(config, generator, text, mesh)
  assert isinstance(state, train_state.GeneratorState)
  want_keys = {"generator", "text_encoder"} if trainable_text else {"generator"}
  assert set(params) == set(state.params) == want_keys
  _assert_params_match_state(params, state.params, shardings.params, mesh)
  _assert_params_match_state(params, state.ema_params, shardings.ema_params, mesh)
