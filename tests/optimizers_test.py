"""Optimizer: schedule shape and the larger learning rate outside the stacks."""
import jax.numpy as jnp
import numpy as np

from phenaki_jax.config import schema
from phenaki_jax import optimizers


def _opt(**overrides):
  opt = schema.cvivit_defaults().optimizer
  for k, v in overrides.items():
    opt[k] = v
  return opt


def test_warmup_then_cosine():
  sched = optimizers.learning_rate_schedule(_opt(learning_rate=1.0, warmup_steps=10,
                                                 end_learning_rate_ratio=0.1), 110)
  assert float(sched(0)) == 0.0
  np.testing.assert_allclose(sched(5), 0.5, rtol=1e-6)
  np.testing.assert_allclose(sched(10), 1.0, rtol=1e-6)
  np.testing.assert_allclose(sched(110), 0.1, rtol=1e-5)


def test_io_parameters_take_the_multiplied_learning_rate():
  opt = _opt(learning_rate=1e-3, warmup_steps=0, schedule="constant", weight_decay=0.0,
             grad_clip_norm=0.0, io_lr_multiplier=10.0)
  tx = optimizers.make_optimizer(opt, 100)
  params = {"first_frame_embed": {"kernel": jnp.ones((3, 3))},
            "quantizer": {"codebook": jnp.ones((4, 2))},
            "encoder": {"spatial": {"block_0": {"kernel": jnp.ones((3, 3))}}}}
  grads = jax_tree_ones(params)
  updates, _ = tx.update(grads, tx.init(params), params)
  # Adam's first step moves every coordinate by ~lr, whatever the gradient scale.
  np.testing.assert_allclose(updates["first_frame_embed"]["kernel"], -1e-2, rtol=1e-3)
  np.testing.assert_allclose(updates["quantizer"]["codebook"], -1e-2, rtol=1e-3)
  np.testing.assert_allclose(updates["encoder"]["spatial"]["block_0"]["kernel"], -1e-3, rtol=1e-3)


def test_weight_decay_only_on_kernels():
  mask = optimizers.decay_mask({"a": {"kernel": 1, "bias": 2}, "norm": {"scale": 3},
                                "codebook": 4})
  assert mask == {"a": {"kernel": True, "bias": False}, "norm": {"scale": False},
                  "codebook": False}


def jax_tree_ones(tree):
  import jax
  return jax.tree.map(jnp.ones_like, tree)


def _moments(state, name):
  """Every (path, leaf) of the state under an Adam `name` ('mu' / 'nu') for the codebook."""
  import jax
  return [leaf for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]
          if any(getattr(k, "name", None) == name for k in path)
          and getattr(path[-1], "key", None) == "codebook"]


def test_restarted_codebook_rows_get_fresh_moments_and_nothing_else_changes():
  import jax
  for multiplier in (1.0, 10.0):  # plain chain, and multi_transform's nested states
    tx = optimizers.make_optimizer(_opt(io_lr_multiplier=multiplier), 100)
    params = {"encoder": {"kernel": jnp.ones((3, 3))},
              "quantizer": {"codebook": jnp.ones((6, 2))}}
    state = tx.init(params)
    for seed in range(3):  # moments that differ by row
      grads = jax.tree.map(lambda x: jax.random.normal(jax.random.key(seed), x.shape), params)
      _, state = tx.update(grads, state, params)
    rows = jnp.asarray([False, True, False, False, True, False])
    new = optimizers.reset_rows(state, ("quantizer", "codebook"), rows)
    (mu,), (nu,) = _moments(state, "mu"), _moments(state, "nu")
    (new_mu,), (new_nu,) = _moments(new, "mu"), _moments(new, "nu")
    assert not np.asarray(new_mu)[[1, 4]].any()
    np.testing.assert_allclose(np.asarray(new_nu)[[1, 4]],
                               np.repeat(np.asarray(nu)[[0, 2, 3, 5]].mean(0, keepdims=True), 2,
                                         axis=0), rtol=1e-6)
    keep = [0, 2, 3, 5]
    np.testing.assert_array_equal(np.asarray(new_mu)[keep], np.asarray(mu)[keep])
    np.testing.assert_array_equal(np.asarray(new_nu)[keep], np.asarray(nu)[keep])
    # The other parameters' state and the step count are as they were.
    others = lambda s: [leaf for path, leaf in jax.tree_util.tree_flatten_with_path(s)[0]
                        if getattr(path[-1], "key", None) != "codebook"]
    for a, b in zip(others(state), others(new)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
