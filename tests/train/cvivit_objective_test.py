"""The full C-ViViT objective: each term, where gradients flow, config checks.

L = L_VQ + 0.1·L_adv + 0.1·L_IP + 1.0·L_VP + 1.0·L2 with a video
discriminator (R1, LeCam), LPIPS and I3D features from the packaged weights.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from phenaki_jax.config import schema
from phenaki_jax import optimizers, sharding
from phenaki_jax.pretrained import perceptual
from phenaki_jax.models import discriminator
from phenaki_jax.train import train_cvivit
from phenaki_jax.train import cvivit_objective
from phenaki_jax import train_state
from tests.helpers import load_config


def _video(seed, shape=(2, 5, 16, 16, 3)):
  return jnp.asarray(np.random.default_rng(seed).uniform(-1, 1, shape), jnp.float32)


# --- Terms on tiny inputs.

def test_adversarial_losses_match_their_definitions():
  real = jnp.array([2.0, 0.5, -1.0])
  fake = jnp.array([-2.0, 0.0, 1.5])
  np.testing.assert_allclose(cvivit_objective.discriminator_loss(real, fake, "hinge"),
                             np.mean([0, 0.5, 2.0]) + np.mean([0, 1.0, 2.5]), rtol=1e-6)
  np.testing.assert_allclose(cvivit_objective.generator_adversarial_loss(fake, "hinge"), -np.mean(fake))
  sp = lambda x: np.log1p(np.exp(x))
  np.testing.assert_allclose(cvivit_objective.discriminator_loss(real, fake, "non_saturating"),
                             np.mean(sp(-np.asarray(real))) + np.mean(sp(np.asarray(fake))),
                             rtol=1e-6)
  np.testing.assert_allclose(cvivit_objective.generator_adversarial_loss(fake, "non_saturating"),
                             np.mean(sp(-np.asarray(fake))), rtol=1e-6)
  with pytest.raises(ValueError, match="wasserstein"):
    cvivit_objective.discriminator_loss(real, fake, "wasserstein")


def test_r1_penalty_of_a_linear_critic_is_its_squared_weight_norm():
  w = jnp.arange(12, dtype=jnp.float32).reshape(1, 2, 2, 3) / 10
  critic = lambda x: jnp.sum(x * w, axis=(1, 2, 3)) + jnp.sum(x**2, axis=(1, 2, 3)) * 0
  x = _video(0, (4, 2, 2, 3))
  r1, logits = cvivit_objective.r1_penalty(critic, x)
  np.testing.assert_allclose(r1, float(jnp.sum(w**2)), rtol=1e-6)
  np.testing.assert_allclose(logits, critic(x), rtol=1e-6)
  # Per example, not of the batch sum: a quadratic critic's gradient is 2x.
  r1_sq, _ = cvivit_objective.r1_penalty(lambda x: jnp.sum(x**2, axis=(1, 2, 3)), x)
  np.testing.assert_allclose(r1_sq, float(jnp.mean(jnp.sum((2 * x)**2, axis=(1, 2, 3)))), rtol=1e-5)


def test_lecam_is_zero_when_logits_sit_beyond_the_moving_averages():
  assert float(cvivit_objective.lecam_regularizer(jnp.array([-1.0]), jnp.array([1.0]), 0.5, -0.5)) == 0
  np.testing.assert_allclose(
      cvivit_objective.lecam_regularizer(jnp.array([1.0]), jnp.array([-1.0]), 0.0, 0.0), 2.0)


def test_perceptual_terms_vanish_for_a_perfect_reconstruction_and_not_otherwise():
  config = schema.complete(load_config("cvivit", "tiny"))
  frozen = cvivit_objective.load_frozen_networks(config)
  video, rng = _video(1), jax.random.key(0)
  lpips = lambda r: float(cvivit_objective.lpips_term(video, r, config.loss, frozen, rng))
  i3d = lambda r: float(cvivit_objective.video_perceptual_term(video, r, config.loss, frozen))
  assert abs(lpips(video)) < 1e-6 and abs(i3d(video)) < 1e-6
  assert lpips(0.5 * video) > 1e-3 and i3d(0.5 * video) > 1e-3
  # Images (1-frame clips) skip the video term, keep LPIPS.
  assert cvivit_objective.video_perceptual_applies(video, config.loss)
  assert not cvivit_objective.video_perceptual_applies(video[:, :1], config.loss)
  assert float(cvivit_objective.lpips_term(video[:, :1], 0.5 * video[:, :1], config.loss, frozen,
                                       rng)) > 1e-3


def test_lpips_frames_are_the_same_frames_of_input_and_reconstruction():
  video = _video(2, (3, 7, 4, 4, 3))
  a = cvivit_objective._random_frames(video, 2, jax.random.key(5))
  b = cvivit_objective._random_frames(video, 2, jax.random.key(5))
  np.testing.assert_array_equal(a, b)
  assert a.shape == (6, 4, 4, 3)
  # Two distinct frames of each clip.
  for clip in range(3):
    idx = [int(np.argmax([np.allclose(a[2 * clip + j], video[clip, t]) for t in range(7)]))
           for j in range(2)]
    assert idx[0] != idx[1]
  assert cvivit_objective._random_frames(video, 0, jax.random.key(0)).shape == (21, 4, 4, 3)


def test_video_perceptual_gradient_reaches_the_prediction_not_the_target():
  variables = perceptual.i3d_variables()
  target, prediction = _video(3), 0.3 * _video(4)
  fn = lambda t, p: jnp.mean(perceptual.i3d_perceptual_distance(
      variables, t, p, endpoint="Conv3d_2c_3x3", resolution=16))
  g_target, g_pred = jax.grad(fn, argnums=(0, 1))(target, prediction)
  assert float(jnp.abs(g_target).max()) == 0.0
  assert float(jnp.abs(g_pred).max()) > 0.0
  assert np.isfinite(np.asarray(g_pred)).all()


@pytest.mark.parametrize("shape,kernel", [((2, 11, 16, 16, 3), (7, 7, 7)),
                                          ((1, 5, 9, 13, 3), (7, 7, 7)),
                                          ((1, 4, 8, 8, 2), (3, 3, 3))])
def test_space_to_depth_conv_is_the_strided_conv(shape, kernel):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=shape), jnp.float32)
  k = jnp.asarray(rng.normal(size=kernel + (shape[-1], 5)), jnp.float32)
  want = jax.lax.conv_general_dilated(x, k, (2, 2, 2), "SAME",
                                      dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
  got = perceptual.space_to_depth_conv(x, k, (2, 2, 2))
  np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-4)


def test_i3d_with_the_fast_stem_computes_the_same_features():
  variables = perceptual.i3d_variables()
  video = _video(5, (1, 5, 32, 32, 3))
  kw = dict(endpoint="Mixed_3c", resolution=32)
  plain = perceptual.i3d_features(variables, video, **kw)
  fast = perceptual.i3d_features(variables, video, fast_input_gradient=True, **kw)
  np.testing.assert_allclose(fast, plain, atol=1e-4 * float(jnp.abs(plain).max()))


def test_discriminator_scores_clips_and_images_with_the_same_weights():
  disc = discriminator.VideoDiscriminator(base_features=4, channel_multipliers=(1, 2))
  video = _video(6, (2, 5, 16, 16, 3))
  params = disc.init(jax.random.key(0), video)
  assert disc.apply(params, video).shape == (2,)
  assert disc.apply(params, video[:, :1]).shape == (2,)
  # It sees time: shuffling the frames changes the score.
  shuffled = video[:, ::-1]
  assert not np.allclose(disc.apply(params, video), disc.apply(params, shuffled))


# --- Where gradients flow inside the train step.

def _step_setup(**loss_overrides):
  config = schema.complete(load_config("cvivit", "tiny"))
  config.gan.start_step = 0
  config.loss.lpips_weight = 0.0  # these two are tested above; keep the step small
  config.loss.video_perceptual_weight = 0.0
  config.loss.max_gradient_ratio = 0.0  # the weights as given: they are what differs here
  for k, v in loss_overrides.items():
    config.loss[k] = v
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  with sharding.use_mesh(mesh, config.logical_axis_rules):
    model = train_state.build_cvivit(config)
    tx = optimizers.make_optimizer(config.optimizer, config.total_steps)
    _, shardings, init = train_state.cvivit_abstract_state(config, model, tx, mesh)
    state = jax.jit(init, out_shardings=shardings)(jax.random.key(0))
    step = jax.jit(train_cvivit.make_train_step(model, tx, config), static_argnames=("phase",))
    frames = np.random.default_rng(0).integers(0, 256, (8, 5, 16, 16, 3), dtype=np.uint8)
    # Two steps: the learning rate warms up from 0, so the first moves nothing
    # but the optimizer's moments and the discriminator.
    state = jax.device_get(state)
    new_state, _, _ = step(state, {"frames": frames}, {}, phase="r1")
    new_state, parts, _ = step(new_state, {"frames": frames[::-1]}, {}, phase="r1")
  return config, model, state, jax.device_get(new_state), jax.device_get(parts)


@pytest.fixture(scope="module")
def two_adversarial_weights():
  return _step_setup(adversarial_weight=0.1), _step_setup(adversarial_weight=0.5)


def test_generator_step_does_not_update_the_discriminator(two_adversarial_weights):
  (_, _, before, low, low_parts), (_, _, _, high, high_parts) = two_adversarial_weights
  # The tokenizer's update depends on the adversarial weight ...
  assert not np.allclose(low.params["tubelet_out"]["kernel"],
                         high.params["tubelet_out"]["kernel"])
  # ... the discriminator's does not: it only sees real clips and the
  # reconstructions as constants, and only its own loss updates it.
  jax.tree.map(np.testing.assert_array_equal, low.disc_params, high.disc_params)
  changed = jax.tree.map(lambda a, b: not np.array_equal(a, b),
                         jax.device_get(before.disc_params), low.disc_params)
  assert any(jax.tree.leaves(changed))
  assert low_parts["train/gan/active"] == 1.0 and low_parts["train/gan/r1"] > 0


def test_discriminator_loss_has_no_gradient_into_the_tokenizer(two_adversarial_weights):
  config, model, state, _, _ = two_adversarial_weights[0]
  disc, _ = train_state.build_discriminator(config)
  loss_fn = cvivit_objective.discriminator_loss_fn(disc, config.gan)
  video = _video(7, (2, 5, 16, 16, 3))

  def through_tokenizer(params):
    recon, _ = model.apply({"params": params}, video)
    return loss_fn(state.disc_params, video, recon, state.lecam_ema)[0]

  grads = jax.grad(through_tokenizer)(state.params)
  assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads)) == 0.0
  d_grads = jax.grad(lambda d: loss_fn(d, video, video * 0.5, state.lecam_ema)[0])(
      state.disc_params)
  assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(d_grads)) > 0.0


def test_gan_phases_follow_the_start_step_and_lazy_r1():
  config = schema.complete(load_config("cvivit", ""))
  config.gan.start_step, config.gan.r1_every = 10, 4
  phases = [cvivit_objective.gan_phase(config, s) for s in range(8, 17)]
  # R1 on the GAN's first step, then on every 4th after it.
  assert phases == ["off", "off", "r1", "on", "on", "on", "r1", "on", "on"]
  config.gan.r1_weight = 0.0
  assert cvivit_objective.gan_phase(config, 12) == "on"
  config.loss.adversarial_weight = 0.0
  assert cvivit_objective.gan_phase(config, 12) == "off"


def test_before_the_start_step_the_discriminator_is_untouched():
  config = schema.complete(load_config("cvivit", "tiny"))
  config.loss.lpips_weight = config.loss.video_perceptual_weight = 0.0
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  with sharding.use_mesh(mesh, config.logical_axis_rules):
    model = train_state.build_cvivit(config)
    tx = optimizers.make_optimizer(config.optimizer, config.total_steps)
    _, shardings, init = train_state.cvivit_abstract_state(config, model, tx, mesh)
    state = jax.jit(init, out_shardings=shardings)(jax.random.key(0))
    frames = np.random.default_rng(0).integers(0, 256, (8, 5, 16, 16, 3), dtype=np.uint8)
    new_state, parts, _ = jax.jit(train_cvivit.make_train_step(model, tx, config),
                               static_argnames=("phase",))(state, {"frames": frames}, {},
                                                           phase="off")
  assert float(parts["train/gan/active"]) == 0.0
  assert "train/gan/generator_loss" not in parts
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.disc_params),
               jax.device_get(new_state.disc_params))


@pytest.mark.slow  # 34-40 s: the whole step, compiled with and without the perceptual terms
def test_before_the_perceptual_start_step_lpips_and_i3d_are_left_out():
  config = schema.complete(load_config("cvivit", "tiny"))
  config.loss.adversarial_weight = 0.0
  config.loss.max_gradient_ratio = 0.0  # the total then differs by exactly the weighted terms
  config.loss.perceptual_start_step = 3
  assert [cvivit_objective.perceptual_on(config, s) for s in range(5)] == [False] * 3 + [True] * 2
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  with sharding.use_mesh(mesh, config.logical_axis_rules):
    model = train_state.build_cvivit(config)
    tx = optimizers.make_optimizer(config.optimizer, config.total_steps)
    _, shardings, init = train_state.cvivit_abstract_state(config, model, tx, mesh)
    state = jax.device_get(jax.jit(init, out_shardings=shardings)(jax.random.key(0)))
    step = jax.jit(train_cvivit.make_train_step(model, tx, config),
                   static_argnames=("phase", "perceptual"))
    frozen = cvivit_objective.load_frozen_networks(config)
    frames = np.random.default_rng(0).integers(0, 256, (8, 5, 16, 16, 3), dtype=np.uint8)
    _, off, _ = step(state, {"frames": frames}, frozen, perceptual=False)
    _, on, _ = step(state, {"frames": frames}, frozen, perceptual=True)
  assert "train/lpips" not in off and "train/video_perceptual" not in off
  assert float(on["train/lpips"]) > 0 and float(on["train/video_perceptual"]) > 0
  # The same reconstruction terms; the total differs by exactly the perceptual terms.
  np.testing.assert_allclose(float(off["train/l2"]), float(on["train/l2"]), rtol=1e-6)
  w = config.loss
  np.testing.assert_allclose(
      float(on["train/loss"]) - float(off["train/loss"]),
      w.lpips_weight * float(on["train/lpips"])
      + w.video_perceptual_weight * float(on["train/video_perceptual"]), rtol=1e-4)


# --- Gradient balancing (loss.max_gradient_ratio).

def _balance_setup(ratio, **loss_overrides):
  config = schema.complete(load_config("cvivit", "tiny"))
  config.loss.max_gradient_ratio = ratio
  for k, v in loss_overrides.items():
    config.loss[k] = v
  model = train_state.build_cvivit(config)
  video = _video(3, (2, 5, 16, 16, 3))
  params = model.init(jax.random.key(0), video)["params"]
  disc, _ = train_state.build_discriminator(config)
  disc_params = disc.init(jax.random.key(1), video)["params"]
  adversarial = lambda r: cvivit_objective.generator_adversarial_loss(
      disc.apply({"params": disc_params}, r), config.gan.loss)
  frozen = cvivit_objective.load_frozen_networks(config)
  def run(p, loss_cfg):
    return cvivit_objective.compute_losses(model, p, video, loss_cfg, frozen=frozen,
                                           rng=jax.random.key(2), adversarial=adversarial)
  return config, model, params, video, run, adversarial


def _loss_and_grads(run, params, loss_cfg):
  return jax.jit(jax.value_and_grad(lambda p: run(p, loss_cfg), has_aux=True))(params)


def _pixel_grad_norm(fn, recon):
  return float(jnp.linalg.norm(jax.grad(fn)(recon).ravel()))


def test_balancing_caps_the_adversarial_terms_pixel_gradient_without_the_perceptual_terms():
  """The cap on one term, in CI: the whole objective's version below compiles LPIPS and I3D."""
  ratio = 1e-3
  config, _, params, video, run, adversarial = _balance_setup(
      ratio, lpips_weight=0.0, video_perceptual_weight=0.0)
  (_, (parts, outputs)), grads = _loss_and_grads(run, params, config.loss)
  recon = outputs["recon"]
  assert "train/lpips_weight" not in parts and "train/video_perceptual_weight" not in parts
  effective = float(parts["train/gan/generator_loss_weight"])
  assert 0 < effective < config.loss.adversarial_weight
  l2_norm = _pixel_grad_norm(lambda r: cvivit_objective.l2_loss(video, r), recon)
  np.testing.assert_allclose(effective * _pixel_grad_norm(adversarial, recon),
                             ratio * l2_norm, rtol=1e-4)
  plain = schema.complete(load_config("cvivit", "tiny")).loss
  plain.max_gradient_ratio = plain.lpips_weight = plain.video_perceptual_weight = 0.0
  plain.adversarial_weight = effective
  _, plain_grads = _loss_and_grads(run, params, plain)
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(plain_grads)):
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=1e-7)


@pytest.mark.slow  # 90-105 s: the whole objective's gradient, compiled twice
def test_balancing_caps_each_terms_pixel_gradient_at_the_ratio_times_l2s():
  ratio = 1e-3
  config, model, params, video, run, _ = _balance_setup(ratio)
  (total, (parts, outputs)), grads = _loss_and_grads(run, params, config.loss)
  recon = outputs["recon"]
  l2_norm = _pixel_grad_norm(lambda r: cvivit_objective.l2_loss(video, r), recon)
  names = ("lpips", "video_perceptual", "gan/generator_loss")
  weights = dict(zip(names, (config.loss.lpips_weight, config.loss.video_perceptual_weight,
                             config.loss.adversarial_weight)))
  for name in names:
    effective = float(parts[f"train/{name}_weight"])
    # A tight cap binds on every term.
    assert 0 < effective < weights[name], name
  # The capped pixel gradient of each term is exactly ratio x L2's.
  lpips_fn = lambda r: cvivit_objective.lpips_term(video, r, config.loss,
                                               cvivit_objective.load_frozen_networks(config),
                                               jax.random.key(2))
  np.testing.assert_allclose(
      float(parts["train/lpips_weight"]) * _pixel_grad_norm(lpips_fn, recon), ratio * l2_norm,
      rtol=1e-4)
  # The loss value is the terms at their effective weights ...
  expected = float(parts["train/l2"]) + float(parts["train/vq/loss"]) + sum(
      float(parts[f"train/{n}_weight"]) * float(parts[f"train/{n}"]) for n in names)
  np.testing.assert_allclose(float(total), expected, rtol=1e-5)
  # ... and its parameter gradient is that of the plain objective with those
  # weights (the linear surrogate carries the same gradient in one backward).
  plain = schema.complete(load_config("cvivit", "tiny")).loss
  plain.max_gradient_ratio = 0.0
  plain.lpips_weight = float(parts["train/lpips_weight"])
  plain.video_perceptual_weight = float(parts["train/video_perceptual_weight"])
  plain.adversarial_weight = float(parts["train/gan/generator_loss_weight"])
  _, plain_grads = _loss_and_grads(run, params, plain)
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(plain_grads)):
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=1e-7)


@pytest.mark.slow  # 46-68 s: two more compilations of the whole objective's gradient
def test_a_loose_cap_leaves_the_weights_and_the_gradient_as_given():
  config, _, params, _, run, _ = _balance_setup(1e9)
  (_, (parts, _)), grads = _loss_and_grads(run, params, config.loss)
  assert float(parts["train/lpips_weight"]) == pytest.approx(config.loss.lpips_weight)
  assert float(parts["train/gan/generator_loss_weight"]) == pytest.approx(
      config.loss.adversarial_weight)
  unbalanced = schema.complete(load_config("cvivit", "tiny")).loss
  unbalanced.max_gradient_ratio = 0.0
  _, plain_grads = _loss_and_grads(run, params, unbalanced)
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(plain_grads)):
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=1e-7)


# --- Config checks, before anything compiles.

@pytest.mark.parametrize("key,value,message", [
    ("loss.lpips_net", "resnet", "config.loss.lpips_net='resnet'"),
    ("gan.loss", "wgan", "config.gan.loss='wgan'"),
    ("loss.video_perceptual_endpoint", "Mixed_9z", "config.loss.video_perceptual_endpoint"),
    ("loss.video_perceptual_endpoint", "Logits", "config.loss.video_perceptual_resolution=0"),
    ("loss.adversarial_weight", -0.1, "config.loss.adversarial_weight=-0.1"),
    ("gan.channel_multipliers", (1, 2, 4, 8, 16), "config.gan.channel_multipliers"),
    ("ema_decay", 1.0, "config.ema_decay=1.0"),
    ("loss.perceptual_start_step", -1, "config.loss.perceptual_start_step=-1"),
    ("loss.max_gradient_ratio", -1.0, "config.loss.max_gradient_ratio=-1.0"),
])
def test_bad_objective_values_fail_naming_the_key(key, value, message, tmp_path):
  config = load_config("cvivit", "tiny")
  *parents, leaf = key.split(".")
  node = config
  for p in parents:
    node = node[p]
  node[leaf] = value
  with pytest.raises(schema.ConfigError, match=message):
    train_cvivit.train_and_evaluate(config, str(tmp_path))


def test_i3d_logits_on_short_clips_fail_naming_the_frame_count(tmp_path):
  config = load_config("cvivit", "tiny")
  config.loss.video_perceptual_endpoint = "Logits"
  config.loss.video_perceptual_resolution = 224
  with pytest.raises(schema.ConfigError, match="config.input.num_frames=5"):
    train_cvivit.train_and_evaluate(config, str(tmp_path))
  # Or the term is skipped on such clips, by config.
  config.loss.video_perceptual_min_frames = 9
  schema.validate_cvivit(schema.complete(config), 8)


@pytest.mark.slow
def test_paper_variant_compiles_and_runs_a_step(tmp_path):
  """configs/cvivit.py:paper at its real shapes (128², 11 frames, width 512,
  8,192 codes, bf16, the full objective), two clips: minutes on a CPU."""
  config = load_config("cvivit", "paper")
  config.input.batch_size = 2
  config.input.video_ratio = 1.0  # the one step is a video step (every term applies)
  config.loss.video_perceptual_clips = 0
  config.mesh.shape = (1, 1, 1)
  config.total_steps, config.eval_every_steps, config.checkpoint_every_steps = 1, 0, 1
  out = train_cvivit.train_and_evaluate(config, str(tmp_path))
  assert out["step"] == 1 and np.isfinite(out["train"]["train/loss"])
  for key in ("train/lpips", "train/video_perceptual", "train/gan/generator_loss"):
    assert np.isfinite(out["train"][key]), key
