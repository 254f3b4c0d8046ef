"""models/layers.py: the fast-path switches give the reference numbers (tiny sizes, CPU).

attention implementation ('' / 'xla' / 'cudnn' with its fallback), bf16 compute
with float32 master weights, scanned vs unrolled layers, remat policies,
TransformerSpec. (The persistent compilation cache: integration/compilation_cache_test.py.)
"""
import dataclasses
import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from phenaki_jax.models import cvivit, layers, maskgit

# --- Attention.


def reference_attention(q, k, v, mask=None, causal=False):
  """Plain einsum softmax attention on (B, L, heads, head_dim)."""
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  if causal:
    lq, lk = q.shape[1], k.shape[1]
    logits = jnp.where(jnp.tril(jnp.ones((lq, lk), bool))[None, None], logits, -1e30)
  if mask is not None:
    logits = jnp.where(mask[:, None, None, :], logits, -1e30)
  return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v)


def qkv(lq=6, lk=6, seed=0):
  keys = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(keys[0], (2, lq, 2, 8))
  k = jax.random.normal(keys[1], (2, lk, 2, 8))
  v = jax.random.normal(keys[2], (2, lk, 2, 8))
  return q, k, v


@pytest.mark.parametrize("causal", [True, False], ids=["causal_temporal", "bidirectional"])
@pytest.mark.parametrize("impl", ["xla", ""])
def test_self_attention_matches_reference(causal, impl):
  q, k, v = qkv()
  out = layers.dot_product_attention(q, k, v, is_causal=causal, implementation=impl)
  np.testing.assert_allclose(out, reference_attention(q, k, v, causal=causal), atol=1e-5)


def test_padded_cross_attention_matches_reference():
  q, k, v = qkv(lq=6, lk=5)
  # As in MaskGIT: the null token always visible, then padded text.
  mask = jnp.array([[True, True, True, False, False], [True, False, False, False, False]])
  out = layers.dot_product_attention(q, k, v, mask=mask[:, None, None, :], implementation="xla")
  np.testing.assert_allclose(out, reference_attention(q, k, v, mask=mask), atol=1e-5)


def test_cudnn_falls_back_to_xla_with_a_warning(caplog):
  q, k, v = qkv(seed=1)
  layers._warned.clear()  # pylint: disable=protected-access
  with caplog.at_level(logging.WARNING):
    assert layers.select_attention_impl("cudnn", q, k) == "xla"
    out = jax.jit(lambda q, k, v: layers.dot_product_attention(
        q, k, v, is_causal=True, implementation="cudnn"))(q, k, v)
  assert "attention_impl='cudnn' is unavailable here" in caplog.text
  np.testing.assert_array_equal(out, jax.jit(lambda q, k, v: layers.dot_product_attention(
      q, k, v, is_causal=True, implementation="xla"))(q, k, v))
  # '' (auto) picks XLA here without a warning; unknown names are errors.
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    assert layers.select_attention_impl("", q, k) == "xla"
  assert "unavailable" not in caplog.text
  with pytest.raises(ValueError, match="attention_impl='flash'"):
    layers.check_attention_impl("flash")


def test_cudnn_reasons_name_the_blocker():
  q = jnp.zeros((1, 4, 2, 8), jnp.bfloat16)
  if jax.default_backend() != "gpu":
    assert "no GPU" in layers.cudnn_unsupported_reason(q, q)
  else:
    assert "dtype" in layers.cudnn_unsupported_reason(q.astype(jnp.float32), q.astype(jnp.float32))
    assert "head_dim" in layers.cudnn_unsupported_reason(
        jnp.zeros((1, 4, 2, 12), jnp.bfloat16), jnp.zeros((1, 4, 2, 12), jnp.bfloat16))


# --- Tiny models.

def tiny_cvivit(**spec_changes):
  """`spec_changes` (scan_layers, remat_policy, dtype, ...) apply to both stacks."""
  spec = layers.TransformerSpec(width=32, num_heads=2, head_dim=16, mlp_dim=64, depth=1,
                                **spec_changes)
  return cvivit.CViViT(image_size=16, patch_size=4, temporal_patch_size=2, spatial_spec=spec,
                       temporal_spec=spec.replace(depth=2), codebook_size=64, code_dim=8)


def tiny_maskgit(**spec_changes):
  spec = layers.TransformerSpec(width=32, num_heads=2, head_dim=16, mlp_dim=64, depth=3,
                                **spec_changes)
  return maskgit.MaskGitTransformer(codebook_size=32, max_token_frames=2, grid_height=3,
                                    grid_width=3, spec=spec)


def video(seed=0, frames=5):
  return jax.random.uniform(jax.random.key(seed), (2, frames, 16, 16, 3), minval=-1, maxval=1)


def maskgit_inputs(seed=0):
  keys = jax.random.split(jax.random.key(seed), 3)
  tokens = jax.random.randint(keys[0], (2, 2, 3, 3), 0, 33)  # 32 = [MASK]
  targets = jax.random.randint(keys[1], (2, 2, 3, 3), 0, 32)
  text = jax.random.normal(keys[2], (2, 4, 12))
  text_mask = jnp.array([[True, True, False, False], [False] * 4])
  return tokens, targets, text, text_mask


def init(model, *args):
  return jax.jit(lambda k: nn.unbox(model.init(k, *args))["params"])(jax.random.key(0))


def cvivit_loss(model):
  def loss(params, x):
    recon, aux = model.apply({"params": params}, x)
    return jnp.mean(jnp.square(recon - x)) + aux["codebook_loss"] + 0.25 * aux["commitment_loss"]
  return loss


def maskgit_loss(model):
  def loss(params, tokens, targets, text, text_mask):
    logits = model.apply({"params": params}, tokens, text, text_mask)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, targets))
  return loss


# --- Scanned vs unrolled layers.

def test_cvivit_scanned_equals_unrolled_given_the_same_weights():
  x = video()
  unrolled, scanned = tiny_cvivit(), tiny_cvivit(scan_layers=True)
  params = init(unrolled, x)
  converted = layers.scan_params(params)
  # The converted tree is exactly the scanned model's layout.
  scanned_shapes = jax.eval_shape(lambda: nn.unbox(scanned.init(jax.random.key(0), x))["params"])
  assert (jax.tree.structure(scanned_shapes) == jax.tree.structure(converted))
  assert jax.tree.map(lambda a: a.shape, scanned_shapes) == jax.tree.map(lambda a: a.shape, converted)
  apply = lambda m: jax.jit(lambda p, v: m.apply({"params": p}, v))
  recon_u, aux_u = apply(unrolled)(params, x)
  recon_s, aux_s = apply(scanned)(converted, x)
  np.testing.assert_allclose(recon_s, recon_u, atol=1e-5)
  np.testing.assert_array_equal(aux_s["codes"], aux_u["codes"])
  back = layers.unscan_params(converted)
  jax.tree.map(np.testing.assert_array_equal, back, params)


def test_cvivit_scan_layers_from_config():
  m = ml_collections.ConfigDict(dict(
      patch_size=4, temporal_patch_size=2, width=32, num_heads=2, head_dim=16, mlp_dim=64,
      spatial_depth=1, temporal_depth=1, codebook_size=64, code_dim=8, remat=True,
      remat_policy="dots_saveable", scan_layers=True, dtype="float32", param_dtype="float32",
      attention_impl="xla", qk_norm=False, zero_init_residual=False))
  model = cvivit.from_config(m, 16)
  for spec in (model.spatial_spec, model.temporal_spec):
    assert (spec.depth, spec.scan_layers, spec.remat_policy, spec.attention_impl) == (
        1, True, "dots_saveable", "xla")
  m.remat_policy = "bogus"
  with pytest.raises(ValueError, match="remat_policy='bogus'"):
    cvivit.from_config(m, 16)


def test_transformer_spec_is_frozen_hashable_canonical_and_checked():
  m = ml_collections.ConfigDict(dict(
      width=32, num_heads=2, head_dim=16, mlp_dim=64, num_layers=3, remat=True,
      dtype="bfloat16", param_dtype="float32", attention_impl=""))
  spec = layers.TransformerSpec.from_config(m, depth=m.num_layers)
  # A section without qk_norm / zero_init_residual (the generator's) takes the defaults.
  assert spec == layers.TransformerSpec(width=32, num_heads=2, head_dim=16, mlp_dim=64, depth=3,
                                        remat_policy="full", dtype=jnp.bfloat16,
                                        attention_impl=None)
  assert (spec.dtype, spec.param_dtype, spec.attention_impl) == (
      jnp.dtype("bfloat16"), jnp.dtype("float32"), "")
  assert hash(spec) == hash(spec.replace()) and spec.replace(depth=1).depth == 1
  assert hash(tiny_maskgit()) == hash(tiny_maskgit())  # usable as a static jit argument
  with pytest.raises(dataclasses.FrozenInstanceError):
    spec.depth = 4
  with pytest.raises(ValueError, match="remat_policy='bogus'"):
    spec.replace(remat_policy="bogus")
  with pytest.raises(ValueError, match="attention_impl='flash'"):
    spec.replace(attention_impl="flash")
  mismatched = cvivit.CViViT(image_size=16, patch_size=4, temporal_patch_size=2,
                             spatial_spec=spec, temporal_spec=spec.replace(width=16),
                             codebook_size=64, code_dim=8)
  with pytest.raises(ValueError, match="must share width"):
    jax.eval_shape(mismatched.init, jax.random.key(0), jnp.zeros((1, 1, 16, 16, 3)))


def test_maskgit_scanned_equals_unrolled_given_the_same_weights():
  tokens, _, text, text_mask = maskgit_inputs()
  unrolled, scanned = tiny_maskgit(), tiny_maskgit(scan_layers=True)
  params = init(unrolled, tokens, text, text_mask)
  out_u = jax.jit(lambda p: unrolled.apply({"params": p}, tokens, text, text_mask))(params)
  out_s = jax.jit(lambda p: scanned.apply({"params": p}, tokens, text, text_mask))(
      layers.scan_params(params))
  np.testing.assert_allclose(out_s, out_u, atol=1e-5)


# --- Remat policies.

@pytest.mark.parametrize("policy", [
    "full", "save_attention_mlp",
    # jax.checkpoint_policies' own, from the same REMAT_POLICIES table as the two above: 12 s more.
    pytest.param("dots_saveable", marks=pytest.mark.slow),
    pytest.param("dots_with_no_batch_dims_saveable", marks=pytest.mark.slow)])
def test_maskgit_remat_policy_keeps_gradients(policy):
  args = maskgit_inputs(1)
  params = init(tiny_maskgit(), args[0], args[2], args[3])
  grads = lambda m: jax.jit(jax.grad(maskgit_loss(m)))(params, *args)
  reference = grads(tiny_maskgit())
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5),
               grads(tiny_maskgit(remat_policy=policy)), reference)


def test_cvivit_scanned_remat_keeps_gradients():
  x = video(2)
  params = init(tiny_cvivit(), x)
  reference = jax.jit(jax.grad(cvivit_loss(tiny_cvivit())))(params, x)
  scanned = tiny_cvivit(scan_layers=True, remat_policy="dots_with_no_batch_dims_saveable")
  grads = jax.jit(jax.grad(cvivit_loss(scanned)))(layers.scan_params(params), x)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5),
               layers.unscan_params(grads), reference)


def test_remat_policy_names():
  assert layers.remat_policy_name(False) == "none"
  assert layers.remat_policy_name(True) == "full"
  assert layers.remat_policy_name(False, "dots_saveable") == "dots_saveable"
  with pytest.raises(ValueError):
    layers.remat_policy_name(True, "everything")


# --- bf16 compute, float32 master weights.

# bf16 has an 8-bit mantissa (relative step 2^-8 ≈ 0.4%); through a few
# layers the loss stays within 2% of float32's.
BF16_LOSS_RTOL = 2e-2


def _bf16_step(model32, model16, loss_fn, params, *args):
  tx = optax.adam(1e-3)
  loss32 = jax.jit(loss_fn(model32))(params, *args)

  @jax.jit
  def step(p, opt_state):
    loss, g = jax.value_and_grad(loss_fn(model16))(p, *args)
    updates, opt_state = tx.update(g, opt_state, p)
    return optax.apply_updates(p, updates), loss, g

  new_params, loss16, grads = step(params, tx.init(params))
  for tree in (new_params, grads):
    assert {x.dtype for x in jax.tree.leaves(tree)} == {jnp.dtype(jnp.float32)}
  return float(loss32), float(loss16)


def test_cvivit_bf16_compute_keeps_float32_weights():
  x = video(3)
  model16 = tiny_cvivit(dtype=jnp.bfloat16)
  params = init(model16, x)
  assert {p.dtype for p in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
  loss32, loss16 = _bf16_step(tiny_cvivit(), model16, cvivit_loss, params, x)
  assert loss16 == pytest.approx(loss32, rel=BF16_LOSS_RTOL)


# 9-26 s. The tokenizer's bf16 test runs the same layers.Transformer / DenseGeneral in CI;
# the generator's cross-attention in bf16 is only here.
@pytest.mark.slow
def test_maskgit_bf16_compute_keeps_float32_weights():
  args = maskgit_inputs(4)
  model16 = tiny_maskgit(dtype=jnp.bfloat16)
  params = init(model16, args[0], args[2], args[3])
  assert {p.dtype for p in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
  logits = jax.jit(lambda p: model16.apply({"params": p}, args[0], args[2], args[3]))(params)
  assert logits.dtype == jnp.float32
  loss32, loss16 = _bf16_step(tiny_maskgit(), model16, maskgit_loss, params, *args)
  assert loss16 == pytest.approx(loss32, rel=BF16_LOSS_RTOL)
