"""C-ViViT: causality, variable length, image path, vector quantisation."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from phenaki_jax.models import cvivit
from phenaki_jax.models.layers import TransformerSpec
from phenaki_jax.models.quantizer import VectorQuantizer, l2_normalize

TP = 2


def tiny_model(**overrides) -> cvivit.CViViT:
  spec = TransformerSpec(width=32, num_heads=2, head_dim=16, mlp_dim=64, depth=1)
  kw = dict(image_size=16, patch_size=4, temporal_patch_size=TP, spatial_spec=spec,
            temporal_spec=spec.replace(depth=2), codebook_size=64, code_dim=8)
  kw.update(overrides)
  return cvivit.CViViT(**kw)


@pytest.fixture(scope="module")
def model_and_params():
  model = tiny_model()
  video = jnp.zeros((1, 5, 16, 16, 3))
  params = jax.jit(lambda k: nn.unbox(model.init(k, video))["params"])(jax.random.key(0))
  return Jitted(model), params


class Jitted:
  """model.apply, jitted per method (eager op-by-op apply is slow on CPU)."""

  def __init__(self, model):
    self.model = model
    self.encode_features = "encode_features"
    self.decode = "decode"
    self._fns = {}

  def apply(self, variables, x, method=None):
    if method not in self._fns:
      self._fns[method] = jax.jit(lambda v, x: self.model.apply(v, x, method=method))
    return self._fns[method](variables, x)


def random_video(key, frames, batch=2):
  return jax.random.uniform(jax.random.key(key), (batch, frames, 16, 16, 3), minval=-1, maxval=1)


def test_codes_of_earlier_token_frames_ignore_later_frames(model_and_params):
  model, params = model_and_params
  video = random_video(1, 11)
  _, aux = model.apply({"params": params}, video)
  feats = model.apply({"params": params}, video, method=model.encode_features)
  for t in range(6):
    last_frame = t * TP  # token frame t covers frames up to t·t_p
    changed = video.at[:, last_frame + 1:].set(random_video(2, 11)[:, last_frame + 1:])
    _, aux2 = model.apply({"params": params}, changed)
    feats2 = model.apply({"params": params}, changed, method=model.encode_features)
    np.testing.assert_array_equal(aux["codes"][:, :t + 1], aux2["codes"][:, :t + 1])
    np.testing.assert_allclose(feats[:, :t + 1], feats2[:, :t + 1], atol=1e-5)
    if t < 5:  # and the change is visible after t, so the test can fail
      assert not np.allclose(feats[:, t + 1:], feats2[:, t + 1:], atol=1e-3)


def test_decoder_is_causal_too(model_and_params):
  model, params = model_and_params
  codes = jax.random.randint(jax.random.key(3), (1, 6, 4, 4), 0, 64)
  out = model.apply({"params": params}, codes, method=model.decode)
  codes2 = codes.at[:, 3:].set((codes[:, 3:] + 1) % 64)
  out2 = model.apply({"params": params}, codes2, method=model.decode)
  # Token frames 0..2 decode to frames 0..4.
  np.testing.assert_allclose(out[:, :5], out2[:, :5], atol=1e-5)
  assert not np.allclose(out[:, 5:], out2[:, 5:], atol=1e-3)


def test_temporal_attention_really_uses_the_past(model_and_params):
  # Guards the causality test against a model that ignores time altogether.
  model, params = model_and_params
  video = random_video(4, 5)
  changed = video.at[:, 0].set(-video[:, 0])
  f1 = model.apply({"params": params}, video, method=model.encode_features)
  f2 = model.apply({"params": params}, changed, method=model.encode_features)
  assert not np.allclose(f1[:, 1:], f2[:, 1:], atol=1e-3)


@pytest.mark.parametrize("frames,token_frames", [(1, 1), (3, 2), (11, 6), (21, 11)])
def test_variable_length(model_and_params, frames, token_frames):
  model, params = model_and_params
  video = random_video(5, frames, batch=1)
  recon, aux = model.apply({"params": params}, video)
  assert aux["codes"].shape == (1, token_frames, 4, 4)
  assert recon.shape == video.shape
  decoded = model.apply({"params": params}, aux["codes"], method=model.decode)
  np.testing.assert_allclose(decoded, recon, atol=1e-5)
  assert cvivit.num_token_frames(frames, TP) == token_frames
  assert cvivit.num_frames_of(token_frames, TP) == frames


@pytest.mark.parametrize("frames", [0, 2, 4, 10])
def test_impossible_frame_counts_are_refused(model_and_params, frames):
  model, params = model_and_params
  with pytest.raises(ValueError, match="1 \\+ k"):
    model.model.apply({"params": params}, jnp.zeros((1, frames, 16, 16, 3)))


def test_image_equals_first_frame_path_of_video(model_and_params):
  model, params = model_and_params
  video = random_video(6, 11)
  recon_v, aux_v = model.apply({"params": params}, video)
  recon_i, aux_i = model.apply({"params": params}, video[:, :1])
  np.testing.assert_array_equal(aux_i["codes"][:, 0], aux_v["codes"][:, 0])
  np.testing.assert_allclose(recon_i[:, 0], recon_v[:, 0], atol=1e-5)


def test_vq_picks_nearest_normalised_code():
  vq = VectorQuantizer(codebook_size=16, code_dim=4)
  x = jax.random.normal(jax.random.key(0), (3, 5, 8))
  params = nn.unbox(vq.init(jax.random.key(1), x))["params"]
  zq, aux = jax.jit(vq.apply)({"params": params}, x)
  z = l2_normalize(x @ params["to_code"]["kernel"] + params["to_code"]["bias"])
  book = l2_normalize(params["codebook"])
  dist = jnp.sum((z[..., None, :] - book) ** 2, -1)
  np.testing.assert_array_equal(aux["codes"], jnp.argmin(dist, -1))
  e = book[aux["codes"]]
  np.testing.assert_allclose(zq, e, atol=1e-6)  # forward value is the code itself
  # Codebook and commitment terms are both ||z - e||² in value.
  np.testing.assert_allclose(aux["codebook_loss"], jnp.mean((z - e) ** 2), rtol=1e-5)
  np.testing.assert_allclose(aux["commitment_loss"], jnp.mean((z - e) ** 2), rtol=1e-5)


def test_vq_gradients_straight_through_and_stop_gradients():
  vq = VectorQuantizer(codebook_size=16, code_dim=4)
  x = jax.random.normal(jax.random.key(0), (4, 8))
  params = nn.unbox(vq.init(jax.random.key(1), x))["params"]

  def grads_of(term):
    def f(p, x):
      zq, aux = vq.apply({"params": p}, x)
      return {"st": jnp.sum(zq * jnp.arange(4.0)), **aux}[term]
    return jax.jit(jax.grad(f, argnums=(0, 1)))(params, x)

  # Straight-through: the output's gradient reaches the input (the encoder)…
  gp, gx = grads_of("st")
  assert float(jnp.abs(gx).sum()) > 0
  assert float(jnp.abs(gp["to_code"]["kernel"]).sum()) > 0
  # …but not the codebook, which only the codebook loss moves.
  assert float(jnp.abs(gp["codebook"]).sum()) == 0
  gp, gx = grads_of("codebook_loss")
  assert float(jnp.abs(gp["codebook"]).sum()) > 0 and float(jnp.abs(gx).sum()) == 0
  gp, gx = grads_of("commitment_loss")
  assert float(jnp.abs(gp["codebook"]).sum()) == 0 and float(jnp.abs(gx).sum()) > 0


def test_gradient_reaches_encoder_through_full_model(model_and_params):
  model, params = model_and_params
  video = random_video(7, 5)
  loss = lambda p: jnp.mean((model.model.apply({"params": p}, video)[0] - video) ** 2)
  grads = jax.jit(jax.grad(loss))(params)
  enc = grads["encoder"]["spatial"]["block_0"]["mlp"]["wi"]["kernel"]
  assert float(jnp.abs(enc).sum()) > 0
  assert float(jnp.abs(grads["first_frame_embed"]["kernel"]).sum()) > 0


def test_usage_and_perplexity():
  from phenaki_jax.models.quantizer import codebook_usage
  out = codebook_usage(jnp.array([0, 0, 1, 1]), 8)
  np.testing.assert_allclose(out["usage"], 2 / 8)
  np.testing.assert_allclose(out["perplexity"], 2.0, rtol=1e-6)
  out = codebook_usage(jnp.arange(8), 8)
  np.testing.assert_allclose(out["usage"], 1.0)
  np.testing.assert_allclose(out["perplexity"], 8.0, rtol=1e-5)


def test_dead_codes_restart_at_encoder_vectors_and_live_codes_stay():
  from phenaki_jax.models.quantizer import restart_dead_codes
  k, d = 8, 4
  codebook = jnp.arange(k * d, dtype=jnp.float32).reshape(k, d)
  vectors = jnp.full((16, d), 7.0).at[:, 0].set(jnp.arange(16.0))
  counts = jnp.zeros((k,)).at[jnp.array([0, 1])].set(jnp.array([10.0, 6.0]))
  usage = jnp.zeros((k,)).at[:2].set(1.0 / k)  # codes 0 and 1 in use, the rest never picked
  new_book, new_usage, restarted = restart_dead_codes(
      codebook, usage, vectors, counts, jax.random.key(0), decay=0.99, dead_fraction=0.1)
  assert int(restarted) == k - 2
  np.testing.assert_array_equal(new_book[:2], codebook[:2])
  for row in np.asarray(new_book[2:]):
    assert any(np.array_equal(row, v) for v in np.asarray(vectors))
  np.testing.assert_allclose(new_usage[2:], 1.0 / k)
  # A code in steady use is never restarted.
  usage = jnp.full((k,), 1.0 / k)
  _, _, restarted = restart_dead_codes(codebook, usage, vectors, jnp.ones((k,)),
                                       jax.random.key(1), decay=0.99, dead_fraction=0.1)
  assert int(restarted) == 0


def test_restarts_prefer_badly_served_vectors():
  from phenaki_jax.models.quantizer import restart_dead_codes
  k, d = 8, 4
  vectors = jax.random.normal(jax.random.key(2), (32, d))
  errors = jnp.zeros((32,)).at[5].set(1.0)  # only vector 5 is poorly served
  book, _, restarted = restart_dead_codes(
      jnp.zeros((k, d)), jnp.zeros((k,)), vectors, jnp.zeros((k,)), jax.random.key(0),
      decay=0.99, dead_fraction=0.1, errors=errors)
  assert int(restarted) == k
  np.testing.assert_allclose(book, jnp.broadcast_to(vectors[5], (k, d)))


def test_restart_draws_are_proportional_to_the_errors():
  from phenaki_jax.models.quantizer import restart_dead_codes
  k = 4000
  vectors = jnp.array([[0.0], [1.0], [2.0]])
  errors = jnp.array([1.0, 3.0, 0.0])
  book, _, _ = restart_dead_codes(jnp.full((k, 1), -1.0), jnp.zeros((k,)), vectors,
                                  jnp.zeros((k,)), jax.random.key(3), decay=0.99,
                                  dead_fraction=0.1, errors=errors)
  picked = np.asarray(book[:, 0])
  assert set(np.unique(picked)) <= {0.0, 1.0}  # a vector with zero error is never drawn
  assert abs(np.mean(picked == 1.0) - 0.75) < 0.03  # 3:1, within ~4 standard errors


def test_zero_init_residual_blocks_start_as_identity_and_qk_norm_runs():
  from phenaki_jax.models.layers import LayerNorm, Transformer, TransformerSpec
  x = jax.random.normal(jax.random.key(0), (2, 6, 16))
  spec = TransformerSpec(width=16, num_heads=2, head_dim=8, mlp_dim=32, depth=2)
  stack = Transformer(spec.replace(zero_init_residual=True, qk_norm=True), causal=True)
  params = jax.jit(lambda k: nn.unbox(stack.init(k, x))["params"])(jax.random.key(1))
  assert "query_norm" in params["block_0"]["self_attention"]
  out = jax.jit(stack.apply)({"params": params}, x)
  norm_params = {"params": params["final_norm"]}
  expected = LayerNorm().apply(norm_params, x)
  np.testing.assert_allclose(out, expected, atol=1e-5)  # blocks add exactly zero at init
  plain = Transformer(spec, causal=True)
  p2 = jax.jit(lambda k: nn.unbox(plain.init(k, x))["params"])(jax.random.key(1))
  assert not np.allclose(jax.jit(plain.apply)({"params": p2}, x),
                         LayerNorm().apply({"params": p2["final_norm"]}, x), atol=1e-3)
