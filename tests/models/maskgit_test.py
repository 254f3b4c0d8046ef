"""MaskGIT transformer: shapes, text padding, empty text, axis names, sharding, sampling."""
import functools

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from phenaki_jax.config import schema
from phenaki_jax import sharding
from phenaki_jax.models import maskgit
from phenaki_jax.models.layers import TransformerSpec
from phenaki_jax.sampling import parallel_decode

V = 32  # codebook size
T, H, W = 3, 2, 3
L, D_TEXT = 5, 12


def tiny_model(**overrides) -> maskgit.MaskGitTransformer:
  kw = dict(codebook_size=V, max_token_frames=4, grid_height=H, grid_width=W,
            spec=TransformerSpec(width=32, num_heads=2, head_dim=16, mlp_dim=64, depth=1))
  kw.update(overrides)
  return maskgit.MaskGitTransformer(**kw)


def inputs(seed=0, batch=2, frames=T):
  # numpy, not jax.random: each new shape would compile its own random kernel.
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, V + 1, (batch, frames, H, W)).astype(np.int32)  # V is [MASK]
  text = rng.normal(size=(batch, L, D_TEXT)).astype(np.float32)
  mask = np.array([[True] * L, [True, True, False, False, False]])[:batch]
  return jnp.asarray(tokens), jnp.asarray(text), jnp.asarray(mask)


def numpy_params(abstract_params, seed=0):
  """Random values of the right shapes without compiling `init` (seconds on CPU)."""
  rng = np.random.default_rng(seed)

  def fill(path, x):
    if path[-1].key == "scale":  # LayerNorm
      return jnp.ones(x.shape, x.dtype)
    return jnp.asarray(rng.normal(0.0, 0.3, x.shape), x.dtype)

  return jax.tree_util.tree_map_with_path(fill, abstract_params)


@pytest.fixture(scope="module")
def setup():
  model = tiny_model()
  tokens, text, mask = inputs()
  variables = jax.eval_shape(model.init, jax.random.key(0), tokens, text, mask)
  params = numpy_params(nn.unbox(variables["params"]))
  apply = jax.jit(lambda p, *a: model.apply({"params": p}, *a))
  return model, variables, params, apply


def test_output_shape_and_dtype(setup):
  model, _, params, apply = setup
  logits = apply(params, *inputs())
  assert logits.shape == (2, T, H, W, V)
  assert logits.dtype == jnp.float32
  assert np.isfinite(np.asarray(logits)).all()
  assert model.mask_id == V


def test_fewer_token_frames_than_max(setup):
  model, _, params, _ = setup
  logits = jax.eval_shape(lambda p, *a: model.apply({"params": p}, *a), params,
                          *inputs(frames=1))
  assert logits.shape == (2, 1, H, W, V)


def test_too_many_token_frames_is_an_error(setup):
  model, _, params, _ = setup
  with pytest.raises(ValueError, match="max_token_frames"):
    jax.eval_shape(lambda p, *a: model.apply({"params": p}, *a), params, *inputs(frames=5))


def test_padded_text_does_not_change_logits(setup):
  _, _, params, apply = setup
  tokens, text, mask = inputs()
  noise = 100.0 * np.random.default_rng(9).normal(size=text.shape).astype(np.float32)
  changed = jnp.where(mask[..., None], text, noise)
  np.testing.assert_allclose(apply(params, tokens, text, mask),
                             apply(params, tokens, changed, mask), atol=1e-5)
  # The real text does matter.
  assert not np.allclose(apply(params, tokens, text, mask),
                         apply(params, tokens, text + 1.0, mask), atol=1e-3)


def test_empty_text_is_finite_and_ignores_text_values(setup):
  _, _, params, apply = setup
  tokens, text, _ = inputs()
  empty = jnp.zeros((2, L), jnp.bool_)
  a = apply(params, tokens, text, empty)
  b = apply(params, tokens, 50.0 * text, empty)
  assert np.isfinite(np.asarray(a)).all()
  np.testing.assert_allclose(a, b, atol=1e-5)


def test_tokens_outside_a_position_influence_it(setup):
  # Bidirectional: a later token frame changes the logits of the first one.
  _, _, params, apply = setup
  tokens, text, mask = inputs()
  changed = tokens.at[:, -1].set((tokens[:, -1] + 1) % V)
  a = apply(params, tokens, text, mask)
  b = apply(params, changed, text, mask)
  assert not np.allclose(a[:, 0], b[:, 0], atol=1e-5)


def test_params_carry_logical_axis_names(setup):
  _, variables, _, _ = setup
  names = flax.traverse_util.flatten_dict(
      flax.core.unfreeze(nn.get_partition_spec(variables))["params"])
  assert names[("token_embedding",)] == jax.sharding.PartitionSpec("vocab", "embed")
  assert names[("to_logits", "kernel")] == jax.sharding.PartitionSpec("embed", "vocab")
  assert names[("null_text",)] == jax.sharding.PartitionSpec("embed")
  assert names[("transformer", "block_0", "cross_attention", "query", "kernel")] == (
      jax.sharding.PartitionSpec("embed", "heads", "kv"))
  # Every parameter is boxed with names (none left unpartitioned).
  boxed = jax.tree.leaves(variables["params"],
                          is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert all(isinstance(x, nn.LogicallyPartitioned) for x in boxed)
  shapes = flax.traverse_util.flatten_dict(jax.tree.map(jnp.shape, nn.unbox(variables["params"])))
  assert shapes[("token_embedding",)] == (128, 32)  # V + 1 rows, padded to 128
  assert shapes[("to_logits", "kernel")] == (32, V)
  assert shapes[("text_projection", "kernel")] == (D_TEXT, 32)


def test_from_config_with_bf16_and_remat():
  cfg = ml_collections.ConfigDict(dict(
      width=32, num_layers=1, num_heads=2, head_dim=16, mlp_dim=64, remat=True,
      dtype="bfloat16", param_dtype="float32", attention_impl=""))
  model = maskgit.from_config(cfg, codebook_size=V, max_token_frames=4, grid_size=(H, W))
  assert (model.grid_height, model.grid_width) == (H, W)
  assert model.spec == TransformerSpec(width=32, num_heads=2, head_dim=16, mlp_dim=64, depth=1,
                                       remat_policy="full", dtype=jnp.bfloat16)
  tokens, text, mask = inputs()
  params = jax.eval_shape(model.init, jax.random.key(0), tokens, text, mask)["params"]
  out = jax.eval_shape(lambda p: model.apply(p, tokens, text, mask), {"params": params})
  assert out.shape == (2, T, H, W, V) and out.dtype == jnp.float32
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nn.unbox(params)))


def test_guided_sampling_with_the_model_compiles_once(setup):
  model, _, params, _ = setup
  _, text, mask = inputs()
  grid = (T, H, W)
  traces = []

  @functools.partial(jax.jit, static_argnames=("max_steps",))
  def sample(params, text, text_mask, rng, num_steps, scale, max_steps=4):
    traces.append(1)

    def logits_fn(m):
      return parallel_decode.flat_logits_fn(
          lambda t: model.apply({"params": params}, t, text, m), grid)

    start = jnp.full((text.shape[0], T * H * W), model.mask_id, jnp.int32)
    fn = parallel_decode.guided_logits_fn(logits_fn(text_mask),
                                          logits_fn(jnp.zeros_like(text_mask)), scale)
    out = parallel_decode.decode(fn, rng, start, num_steps, mask_id=model.mask_id,
                                 max_steps=max_steps)
    return parallel_decode.unflatten_tokens(out.tokens, grid)

  a = sample(params, text, mask, jax.random.key(0), jnp.int32(2), jnp.float32(3.0))
  b = sample(params, text, mask, jax.random.key(0), jnp.int32(4), jnp.float32(1.5))
  assert len(traces) == 1
  assert a.shape == b.shape == (2, T, H, W)
  assert ((np.asarray(a) >= 0) & (np.asarray(a) < V)).all()


def test_sharded_equals_unsharded(setup):
  # 8 simulated devices as (data, fsdp, tensor) = (2, 2, 2); 'vocab' on tensor
  # too, which the padded embedding rows make possible.
  model, variables, params, apply = setup
  rules = schema.TOKENIZER_RULES + (("vocab", "tensor"),)
  mesh = sharding.make_mesh((2, 2, 2))
  shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(variables), mesh, rules)
  sharded = jax.device_put(params, shardings["params"])
  fn = jax.jit(lambda p, *a: model.apply({"params": p}, *a))
  with sharding.use_mesh(mesh, rules):
    lowered = fn.lower(sharded, *inputs())
    assert lowered.as_text().count("sharding_constraint") > 10
    out = lowered.compile()(sharded, *inputs())
  np.testing.assert_allclose(out, apply(params, *inputs()), atol=1e-5)


@pytest.mark.slow  # 26 s; layers_test's scanned-equals-unrolled runs in CI (this adds remat)
def test_scanned_layers_compute_what_the_unrolled_stack_computes():
  """Same weights (stacked on a leading axis), same logits; remat changes nothing either."""
  import flax
  from phenaki_jax.models import maskgit as maskgit_lib
  spec = TransformerSpec(width=16, num_heads=2, head_dim=8, mlp_dim=32, depth=3)
  kw = dict(codebook_size=32, max_token_frames=2, grid_height=2, grid_width=2)
  loop = maskgit_lib.MaskGitTransformer(**kw, spec=spec)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 33, (2, 2, 2, 2)), jnp.int32)
  text = jnp.asarray(np.random.default_rng(1).normal(size=(2, 5, 8)), jnp.float32)
  mask = jnp.asarray([[True] * 5, [True, True, False, False, False]])
  params = flax.core.unfreeze(nn.unbox(loop.init(jax.random.key(0), tokens, text, mask)))["params"]
  # Unrolled blocks have non-zero residual outputs only after training: perturb all weights.
  params = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(2), x.shape), params)
  stacked = dict(params)
  stack = stacked["transformer"] = dict(params["transformer"])
  blocks = [stack.pop(f"block_{i}") for i in range(3)]
  stack["blocks"] = jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)
  want = loop.apply({"params": params}, tokens, text, mask)
  for remat in (False, True):
    scanned = maskgit_lib.MaskGitTransformer(
        **kw, spec=spec.replace(scan_layers=True, remat_policy="full" if remat else "none"))
    abstract = jax.eval_shape(scanned.init, jax.random.key(0), tokens, text, mask)["params"]
    assert jax.tree.map(lambda x: x.shape, nn.unbox(abstract)) == jax.tree.map(
        lambda x: x.shape, stacked)
    got = scanned.apply({"params": stacked}, tokens, text, mask)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # The stacked axis is named 'layers' for the sharding rules.
  names = nn.get_partition_spec(abstract)["transformer"]["blocks"]["mlp"]
  assert jax.tree.leaves(names, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))[0][0] == "layers"

# --- Long-term memory (memory_token_frames > 0): extra cross-attention context.

_PLAIN_PARAMS = {"token_embedding", "frame_pos", "row_pos", "col_pos", "text_projection",
                 "null_text", "transformer", "to_logits"}


@pytest.fixture(scope="module")
def memory_setup():
  model = tiny_model(memory_token_frames=1)
  variables = jax.eval_shape(model.init, jax.random.key(0), *inputs())
  params = numpy_params(nn.unbox(variables["params"]), seed=1)
  apply = jax.jit(lambda p, *a: model.apply({"params": p}, *a))
  memory = jnp.asarray(np.random.default_rng(4).integers(0, V, (2, 1, H, W)), jnp.int32)
  return variables, params, apply, memory


def test_without_memory_the_parameters_are_those_of_before_and_memory_is_refused(setup):
  _, variables, params, apply = setup
  assert set(nn.unbox(variables["params"])) == _PLAIN_PARAMS
  tokens, text, mask = inputs()
  with pytest.raises(ValueError, match="memory_token_frames=0"):
    apply(params, tokens, text, mask, tokens[:, :1])


def test_memory_parameters_and_their_axis_names(memory_setup):
  variables, _, _, _ = memory_setup
  assert set(nn.unbox(variables["params"])) == _PLAIN_PARAMS | {"memory"}
  names = flax.traverse_util.flatten_dict(
      flax.core.unfreeze(nn.get_partition_spec(variables))["params"])
  assert names[("memory", "frame_pos")] == jax.sharding.PartitionSpec("frames", "embed")
  assert names[("memory", "norm", "norm", "scale")] == jax.sharding.PartitionSpec("embed")


def test_memory_changes_the_logits_and_an_absent_memory_is_no_memory(memory_setup):
  _, params, apply, memory = memory_setup
  tokens, text, mask = inputs()
  on, off = jnp.ones((2,), jnp.bool_), jnp.zeros((2,), jnp.bool_)
  none = apply(params, tokens, text, mask)
  given = apply(params, tokens, text, mask, memory, on)
  assert not np.allclose(given, none, atol=1e-3)
  assert not np.allclose(given, apply(params, tokens, text, mask, (memory + 1) % V, on),
                         atol=1e-3)
  # Behind an all-False mask its values do not matter: the memory-free model,
  # the very one a generator without memory computes with the same weights.
  np.testing.assert_allclose(apply(params, tokens, text, mask, memory, off), none, atol=1e-5)
  np.testing.assert_allclose(apply(params, tokens, text, mask, (memory + 1) % V, off), none,
                             atol=1e-5)
  shared = {k: v for k, v in params.items() if k in _PLAIN_PARAMS}
  np.testing.assert_allclose(tiny_model().apply({"params": shared}, tokens, text, mask), none,
                             atol=1e-5)
  # Per example: only example 1 has its memory.
  mixed = apply(params, tokens, text, mask, memory, jnp.array([False, True]))
  np.testing.assert_allclose(mixed[0], none[0], atol=1e-5)
  np.testing.assert_allclose(mixed[1], given[1], atol=1e-5)
  with pytest.raises(ValueError, match="memory must be"):
    apply(params, tokens, text, mask, jnp.concatenate([memory, memory], axis=1), on)
