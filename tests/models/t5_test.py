"""models/t5.py: the T5 encoder module (relative position buckets vs Hugging Face,
padding, jit / bf16, logical axes and sharded numerics).

Loaders: tests/text/t5_weights_test.py; tokenizers: tests/text/text_tokenizers_test.py.
The bucket parity test needs the test extra (torch CPU, transformers) and is
skipped without it.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from phenaki_jax.models import t5
from phenaki_jax.text import text_tokenizers
from tests.helpers import t5_ids_with_padding, torch_modules


@pytest.mark.parametrize('buckets,max_distance', [(32, 128), (32, 16),
                                                  (64, 256)])
def test_relative_position_buckets_match_hf(buckets, max_distance):
  torch, _ = torch_modules()
  modeling_t5 = pytest.importorskip('transformers.models.t5.modeling_t5')
  n = 300
  rel = torch.arange(n)[None, :] - torch.arange(n)[:, None]
  want = modeling_t5.T5Attention._relative_position_bucket(
      rel, bidirectional=True, num_buckets=buckets,
      max_distance=max_distance).numpy()
  got = t5.relative_position_buckets(n, n, buckets, max_distance)
  np.testing.assert_array_equal(got, want)


def test_padding_does_not_change_real_tokens():
  module = t5.BYT5_TINY.make_module()
  ids, mask = t5_ids_with_padding(vocab_size=259)
  variables = module.init(jax.random.key(0), jnp.asarray(ids))
  apply = jax.jit(module.apply)
  out, out_mask = apply(variables, jnp.asarray(ids))
  np.testing.assert_array_equal(out_mask, mask)

  # Junk in padded slots, flagged as padding by an explicit mask.
  rng = np.random.default_rng(1)
  junk = np.where(mask, ids, rng.integers(3, 259, ids.shape))
  out2, _ = apply(variables, jnp.asarray(junk), jnp.asarray(mask))
  np.testing.assert_allclose(np.asarray(out2)[mask], np.asarray(out)[mask],
                             atol=1e-5)
  # Fewer padded positions (rows 1 and 2 fit in 17) give the same outputs on
  # the real tokens.
  short = mask[1:, :17]
  out3, _ = apply(variables, jnp.asarray(ids[1:, :17]))
  np.testing.assert_allclose(np.asarray(out3)[short],
                             np.asarray(out)[1:, :17][short], atol=1e-5)


def test_byte_encoder_jit_and_bf16():
  module = t5.BYT5_TINY.make_module()
  tok = text_tokenizers.ByteTokenizer()
  ids, mask = tok.encode_batch(['a red fox', 'zoom out slowly over the sea'],
                               16)
  variables = module.init(jax.random.key(0), jnp.asarray(ids))
  eager, _ = module.apply(variables, ids)
  jitted, _ = jax.jit(module.apply)(variables, ids)
  assert eager.shape == (2, 16, t5.BYT5_TINY.d_model)
  np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), atol=1e-5)
  assert np.isfinite(np.asarray(eager)).all()

  bf16 = t5.BYT5_TINY.make_module(dtype=jnp.bfloat16)
  out, _ = jax.jit(bf16.apply)(variables, ids)
  assert out.dtype == jnp.bfloat16
  err = np.abs(np.asarray(out, np.float32) - np.asarray(eager))[mask]
  assert err.max() < 0.1 * np.abs(np.asarray(eager)).max()


def test_logical_axes_and_sharded_numerics():
  module = t5.BYT5_TINY.make_module()
  ids = jnp.asarray(t5_ids_with_padding(vocab_size=259)[0][:2, :16])
  ids = jnp.concatenate([ids] * 4)  # batch 8 divides the mesh
  variables = module.init(jax.random.key(0), ids)
  axes = nn.get_partition_spec(variables)['params']
  assert tuple(axes['token_embedder']['embedding']) == ('vocab', 'embed')
  assert tuple(axes['relpos_bias']['rel_embedding']) == ('heads',
                                                         'relpos_buckets')
  layer = axes['layers_0']
  assert tuple(layer['attention']['query']['kernel']) == ('embed', 'heads',
                                                          'kv')
  assert tuple(layer['attention']['out']['kernel']) == ('heads', 'kv', 'embed')
  assert tuple(layer['mlp']['wo']['kernel']) == ('mlp', 'embed')
  assert tuple(layer['pre_mlp_layer_norm']['scale']) == ('embed',)

  params = nn.unbox(variables)
  want, _ = jax.jit(module.apply)(params, ids)
  mesh = jax.make_mesh((2, 2, 2), ('data', 'fsdp', 'tensor'),
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  rules = (('act_batch', ('data', 'fsdp')), ('act_heads', 'tensor'),
           ('act_mlp', 'tensor'), ('act_len', None), ('act_embed', None))
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    fn = jax.jit(module.apply)
    assert 'sharding_constraint' in fn.lower(params, ids).as_text()
    got, _ = fn(params, ids)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)

