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
