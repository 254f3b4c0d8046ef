"""MaskGIT trainer: text dropout, image = first-frame loss, masking, tokenizer checks, resume.

Loss-level tests feed precomputed `codes` (no tokenizer needed); the trainer
runs use a `configs/cvivit.py:tiny` tokenizer trained once for the module.
"""
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from phenaki_jax.config import schema
from phenaki_jax import metrics, optimizers, sharding
from phenaki_jax.sampling import mask_schedule
from phenaki_jax.tokenizer import Tokenizer
from phenaki_jax.train import train_cvivit, train_maskgit
from phenaki_jax.train import maskgit_objective
from phenaki_jax.text import encoder as text_encoder
from phenaki_jax import tokenizer as tokenizer_lib
from phenaki_jax.train import loop as train_loop
from phenaki_jax import train_state
from tests.helpers import load_config, write_tiny_t5x

GRID = (3, 4, 4)  # configs/maskgit.py:tiny
V = 64
FULL = np.full((8,), GRID[0], np.int32)  # every token frame real


def _tiny(tokenizer_dir, **top):
  config = load_config("maskgit", "tiny")
  config.tokenizer.workdir = tokenizer_dir
  for k, v in top.items():
    config[k] = v
  return config


def _set(config, dotted, value):
  *parents, leaf = dotted.split(".")
  for p in parents:
    config = config[p]
  config[leaf] = value


def _losses(workdir):
  rows = metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


# --- Fixtures.

_CACHE_KEYS = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
               "jax_persistent_cache_min_entry_size_bytes")


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
  """A persistent compilation cache for this module only.

  The three trainer runs compile the same steps; from the cache they get the
  very same executables (numerics unchanged) at a fraction of the time.
  """
  from jax.experimental.compilation_cache import compilation_cache as cc
  saved = {k: getattr(jax.config, k) for k in _CACHE_KEYS}
  cc.reset_cache()
  jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  yield
  for k, v in saved.items():
    jax.config.update(k, v)
  cc.reset_cache()


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("tokenizer"))
  # The L2 + VQ objective: the GAN and perceptual networks do not change
  # what the generator sees, only how long the fixture takes.
  config = load_config("cvivit", "tiny,l2vq")
  config.total_steps, config.checkpoint_every_steps, config.eval_every_steps = 1, 1, 0
  train_cvivit.train_and_evaluate(config, workdir)
  return workdir


@pytest.fixture(scope="module")
def uninterrupted(tokenizer_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("whole"))
  return workdir, train_maskgit.train_and_evaluate(_tiny(tokenizer_dir), workdir)


def _random_params(module, *args, seed=0):
  """Parameters of the right shapes without compiling `init` (seconds on CPU)."""
  abstract = sharding.strip_boxes(jax.eval_shape(module.init, jax.random.key(0), *args)["params"])
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map_with_path(
      lambda path, x: (jnp.ones(x.shape, x.dtype) if path[-1].key == "scale"
                       else jnp.asarray(rng.normal(0.0, 0.1, x.shape), x.dtype)), abstract)


class LossSetup:
  """The tiny generator and byte encoder with random params, and the jitted loss."""

  def __init__(self):
    self.config = config = schema.complete(load_config("maskgit", "tiny"))
    self.generator = train_state.build_maskgit(config)
    self.text = text_encoder.build_text_encoder(config.text)
    self.max_length = config.text.max_length
    ones = jnp.ones((1, self.max_length), jnp.int32)
    self.params = {
        "generator": _random_params(self.generator, jnp.zeros((1,) + GRID, jnp.int32),
                                    jnp.zeros((1, self.max_length, self.text.width)), ones),
        "text_encoder": _random_params(self.text.module, ones, seed=1),
    }

    def loss(params, batch, rng, drop_rate):
      return maskgit_objective.compute_losses(
          self.generator, self.text, params, {}, batch, batch["codes"], rng,
          text_drop_rate=drop_rate, label_smoothing=0.1, schedule="cosine")

    self.loss = jax.jit(loss)
    self.grad = jax.jit(jax.value_and_grad(loss, has_aux=True))

  def batch(self, codes, captions, **extra):
    ids, mask = self.text.tokenizer.encode_batch(captions, self.max_length)
    return {"codes": jnp.asarray(codes), "text_ids": jnp.asarray(ids),
            "text_mask": jnp.asarray(mask), **extra}


@pytest.fixture(scope="module")
def setup():
  return LossSetup()


def _codes(rng, n, frames=GRID[0]):
  return rng.integers(0, V, (n, frames) + GRID[1:]).astype(np.int32)


def _captions(n):
  shapes, colours = ("circle", "square", "triangle"), ("red", "green", "blue", "white")
  return [f"a {colours[i % 4]} {shapes[i % 3]} moves left" for i in range(n)]


@pytest.fixture(scope="module")
def big_batch(setup):
  """2,000 examples through the real loss function, once."""
  n = 2000
  batch = setup.batch(_codes(np.random.default_rng(0), n), _captions(n))
  rng = train_loop.step_rng(0, 7)
  _, parts = setup.loss(setup.params, batch, rng, 0.1)
  return n, batch, rng, jax.device_get(parts)


# --- Classifier-free guidance: text dropout.

def _binomial_ok(count, n, p, sigmas=3.5):
  return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


def test_text_drop_rate_over_2000_examples_in_one_step(big_batch):
  n, _, _, parts = big_batch
  dropped = round(float(parts["train/text_dropped_fraction"]) * n)
  assert _binomial_ok(dropped, n, 0.1), dropped  # 200 ± 47


def test_text_drop_rate_over_steps_as_the_trainer_draws_it():
  # 250 steps × 8 examples, each step's rng derived as the train step does.
  draw = jax.jit(jax.vmap(lambda s: maskgit_objective.text_drop_mask(
      maskgit_objective.split_step_rng(train_loop.step_rng(0, s))[1], 8, 0.1)))
  drops = np.asarray(draw(jnp.arange(250)))
  assert _binomial_ok(int(drops.sum()), drops.size, 0.1), drops.sum()
  # Fresh draws per step, not one pattern repeated.
  assert len({tuple(row) for row in drops}) > 10
  assert not np.asarray(jax.jit(jax.vmap(lambda s: maskgit_objective.text_drop_mask(
      train_loop.step_rng(0, s), 8, 0.0)))(jnp.arange(250))).any()


def test_zero_drop_rate_drops_nothing_and_dropped_text_is_the_empty_text(setup):
  step = train_loop.step_rng(0, 5)
  codes = _codes(np.random.default_rng(1), 8)
  batch = setup.batch(codes, _captions(8), token_frames=FULL)
  other = setup.batch(codes, _captions(9)[1:], token_frames=FULL)
  (_, parts), _ = setup.grad(setup.params, batch, step, 0.0)
  assert float(parts["train/text_dropped_fraction"]) == 0.0
  # With every text dropped the captions cannot matter; with none they do.
  dropped = [float(setup.grad(setup.params, b, step, 1.0)[0][0]) for b in (batch, other)]
  assert dropped[0] == dropped[1]
  kept = [float(setup.grad(setup.params, b, step, 0.0)[0][0]) for b in (batch, other)]
  assert kept[0] != kept[1]


# --- Masking.

def test_mask_ratio_values():
  r = jnp.array([0.0, 1 / 3, 0.5, 1.0])
  np.testing.assert_allclose(mask_schedule.mask_ratio(r, "cosine"),
                             [1.0, math.cos(math.pi / 6), math.sqrt(0.5), 0.0], atol=1e-6)


def test_realised_mask_ratio_follows_cos_of_uniform_r(big_batch):
  n, batch, rng, parts = big_batch
  # E[cos(π r / 2)] = 2/π for r ~ U(0, 1); sd 0.31 per example.
  assert abs(float(parts["train/mask_ratio"]) - 2 / math.pi) < 4 * 0.308 / math.sqrt(n)
  # Per example, as compute_losses masks: P(γ > 1/2) = P(r < 2/3) = 2/3, ≥ 1 token masked.
  tokens, region = maskgit_objective.pad_token_grid(batch["codes"], GRID[0], V)
  masked = mask_schedule.sample_mask(maskgit_objective.split_step_rng(rng)[0], tokens.shape,
                                     "cosine", loss_region=region)
  ratio = np.asarray(masked).reshape(n, -1).mean(axis=1)
  assert ratio.min() > 0
  assert _binomial_ok(int((ratio > 0.5).sum()), n, 2 / 3), (ratio > 0.5).sum()
  # Every bucket of r is reported.
  assert all(parts[f"bucket_stats/{b}/count"] > 0 for b in maskgit_objective.R_BUCKETS)


# --- Images: loss on first-frame tokens only.

def test_image_examples_take_the_loss_on_first_frame_tokens_only(setup):
  rng = np.random.default_rng(3)
  step = train_loop.step_rng(0, 11)
  captions = _captions(8)
  image = _codes(rng, 8, frames=1)
  as_clip = np.concatenate([image, _codes(rng, 8, frames=2)], axis=1)
  as_clip_changed = np.concatenate([image, _codes(rng, 8, frames=2)], axis=1)
  first_only = jnp.ones((8,), jnp.int32)

  # The same images given as 1-frame clips (what the pipeline's image batches
  # encode to) or as clips whose later token frames are marked padding.
  image_loss = float(setup.loss(setup.params, setup.batch(image, captions), step, 0.1)[0])
  padded = [setup.grad(setup.params, setup.batch(c, captions, token_frames=first_only), step, 0.1)
            for c in (as_clip, as_clip_changed)]
  np.testing.assert_allclose(float(padded[0][0][0]), image_loss, rtol=1e-6)
  # Later-frame tokens changed: loss and gradients bitwise the same.
  assert float(padded[0][0][0]) == float(padded[1][0][0])
  jax.tree.map(np.testing.assert_array_equal, padded[0][1], padded[1][1])

  # The masks and inputs: [MASK] beyond the first token frame, never in the loss.
  tokens, region = maskgit_objective.pad_token_grid(jnp.asarray(image), GRID[0], V)
  masked = np.asarray(mask_schedule.sample_mask(maskgit_objective.split_step_rng(step)[0],
                                                tokens.shape, "cosine", loss_region=region))
  assert (np.asarray(tokens)[:, 1:] == V).all()
  assert not masked[:, 1:].any() and masked[:, 0].reshape(8, -1).sum(axis=1).min() >= 1

  # Control: as videos (every token frame real) the later frames do change
  # the loss and the gradients.
  video = [setup.grad(setup.params, setup.batch(c, captions, token_frames=FULL), step, 0.1)
           for c in (as_clip, as_clip_changed)]
  assert float(video[0][0][0]) != float(video[1][0][0])
  assert not np.array_equal(video[0][1]["generator"]["to_logits"]["kernel"],
                            video[1][1]["generator"]["to_logits"]["kernel"])


# --- Non-finite steps.

def test_sharded_step_skips_nonfinite_and_matches_unsharded_loss(setup):
  # The train step on a (data, fsdp, tensor) = (2, 2, 2) mesh with the
  # generator rules, precomputed codes and text embeddings; a NaN in the
  # embeddings makes the loss NaN.
  config = setup.config
  mesh = sharding.make_mesh((2, 2, 2))
  rules = config.logical_axis_rules
  with sharding.use_mesh(mesh, rules):
    tx = optimizers.make_optimizer(config.optimizer, config.total_steps)
    _, shardings, _ = train_state.maskgit_abstract_state(
        config, setup.generator, setup.text, tx, mesh)
    params = jax.device_get(setup.params)
    state = jax.device_put(train_state.GeneratorState(
        step=np.int32(0), params=params, opt_state=jax.device_get(tx.init(params)),
        ema_params=params, nonfinite_streak=np.int32(0)), shardings)
    step = jax.jit(train_maskgit.make_train_step(setup.generator, setup.text, None, tx, config),
                   in_shardings=(shardings, sharding.batch_sharding(mesh, rules), None),
                   donate_argnums=(0,))
    rng = np.random.default_rng(5)
    good = {"codes": _codes(rng, 8),
            "text_embeddings": rng.normal(size=(8, 6, setup.text.width)).astype(np.float32),
            "text_mask": np.ones((8, 6), bool)}
    bad = dict(good, text_embeddings=np.full_like(good["text_embeddings"], np.nan))
    frozen = {"tokenizer": {}, "text_encoder": {}}
    # Copies: on CPU a fetched array can share the buffer that donation reuses.
    host = lambda tree: jax.tree.map(np.array, jax.device_get(tree))
    before = host(state)
    state, out, streak_bad = step(state, bad, frozen)
    after_bad = host(state)
    state, out_good, streak_good = step(state, good, frozen)
    # (The warm-up's first learning rate is 0: a second step moves the params.)
    state, _, _ = step(state, good, frozen)
  assert float(out["train/nonfinite_step_fraction"]) == 1.0 and int(streak_bad) == 1
  jax.tree.map(np.testing.assert_array_equal, (after_bad.params, after_bad.ema_params,
                                               after_bad.opt_state),
               (before.params, before.ema_params, before.opt_state))
  assert int(after_bad.step) == 1
  assert float(out_good["train/nonfinite_step_fraction"]) == 0.0
  assert int(streak_good) == 0 and np.isfinite(float(out_good["train/loss"]))
  assert not np.array_equal(jax.device_get(state.params["generator"]["to_logits"]["kernel"]),
                            before.params["generator"]["to_logits"]["kernel"])
  # The same loss without a mesh (the skipped step left the params as they were).
  unsharded = jax.jit(lambda p, b: maskgit_objective.compute_losses(
      setup.generator, setup.text, p, {}, b, b["codes"], train_loop.step_rng(config.seed, 1),
      text_drop_rate=config.text_drop_rate, label_smoothing=config.loss.label_smoothing,
      schedule=config.mask_schedule, prefix_probability=config.prefix.probability,
      prefix_corrupt_fraction=config.prefix.corrupt_fraction)[0])(setup.params, good)
  np.testing.assert_allclose(float(out_good["train/loss"]), float(unsharded), rtol=1e-5)


# --- Tokenizer checks and config errors.

@pytest.mark.parametrize("key,value,message", [
    ("model.codebook_size", 128,
     r"config.model.codebook_size=128 but the tokenizer has 64 codes .*: set "
     r"config.model.codebook_size=64"),
    ("model.token_grid", (3, 4, 5),
     r"config.model.token_grid=\(3, 4, 5\) but .* into a 3x4x4 token grid"),
    ("input.num_frames", 7,
     r"config.model.token_grid=\(3, 4, 4\) but .*config.input.num_frames=7 .* 4x4x4 token grid"),
    ("input.num_frames", 6, r"config.input.num_frames=6: the tokenizer takes 1 \+ k·2 frames"),
    ("input.resolution", 32,
     r"config.input.resolution=32 but the tokenizer was built for 16px frames"),
])
def test_tokenizer_mismatch_names_what_differs(tokenizer_dir, tmp_path, key, value, message):
  config = _tiny(tokenizer_dir)
  _set(config, key, value)
  with pytest.raises(schema.ConfigError, match=message):
    train_maskgit.train_and_evaluate(config, str(tmp_path))
  assert not (tmp_path / "checkpoints").exists()
  assert not (tmp_path / tokenizer_lib.TOKENIZER_RECORD).exists()


def test_missing_tokenizer_is_named(tmp_path):
  config = _tiny(str(tmp_path / "no_tokenizer"))
  with pytest.raises(schema.ConfigError,
                     match="config.tokenizer.workdir=.*no C-ViViT checkpoint"):
    train_maskgit.train_and_evaluate(config, str(tmp_path / "run"))


@pytest.mark.parametrize("key,value,message", [
    ("text.encoder", "bert", r"config.text.encoder='bert'"),
    ("text_drop_rate", 1.5, r"config.text_drop_rate=1.5"),
    ("loss.label_smoothing", 1.0, r"config.loss.label_smoothing=1.0"),
    ("ema_decay", 1.0, r"config.ema_decay=1.0"),
    ("mask_schedule", "cubic", r"config.mask_schedule='cubic'"),
    ("model.token_grid", (3, 4), r"config.model.token_grid=\(3, 4\)"),
    ("model.width", 0, r"config.model.width=0"),
    ("text.max_length", 0, r"config.text.max_length=0"),
    ("tokenizer.workdir", "", r"config.tokenizer.workdir=''"),
    ("mesh.shape", (3, 1, 1), r"config.mesh.shape"),
    ("input.batch_size", 6, r"config.input.batch_size=6"),
    ("model.dtype", "float33", r"config.model.dtype='float33'"),
    ("text.t5_path", "", r"config.text.t5_path='': is required when text.encoder='t5'"),
])
def test_bad_values_fail_before_anything_loads_naming_the_key(tmp_path, key, value, message):
  # A tokenizer dir that does not exist: had validation passed, loading it
  # would fail with a different message.
  config = _tiny(str(tmp_path / "no_tokenizer"))
  _set(config, key, value)
  if key == "text.t5_path":
    config.text.encoder = "t5"
  with pytest.raises(schema.ConfigError, match=message):
    train_maskgit.train_and_evaluate(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


def test_unknown_key_is_named(tmp_path):
  config = _tiny(str(tmp_path))
  with config.unlocked():
    config.text.max_lenght = 3
  with pytest.raises(schema.ConfigError, match="config.text.max_lenght"):
    train_maskgit.train_and_evaluate(config, str(tmp_path / "run"))


# --- A pretrained, frozen T5 (T5X .npz + SentencePiece).

def test_frozen_t5x_encoder_loads_and_stays_out_of_the_train_state(tmp_path, tokenizer_dir):
  pytest.importorskip("sentencepiece")
  path, params = write_tiny_t5x(tmp_path, _captions(200))
  config = _tiny(tokenizer_dir)
  config.text.encoder, config.text.t5_path = "t5", path
  text = text_encoder.build_text_encoder(config.text)
  assert not text.trainable and text.width == 16
  assert text.tokenizer.encode("a red circle")[-1] == 1  # SentencePiece with EOS
  jax.tree.map(np.testing.assert_array_equal, text.pretrained, params)

  # Placed on the mesh as a frozen input; the state has no text encoder.
  tok = Tokenizer.load(tokenizer_dir)
  mesh = sharding.make_mesh((2, 2, 2))
  with sharding.use_mesh(mesh, config.logical_axis_rules):
    frozen, _ = train_maskgit.frozen_inputs(tok, text, config, mesh)
    generator = train_state.build_maskgit(config)
    tx = optimizers.make_optimizer(config.optimizer, config.total_steps)
    abstract, _, _ = train_state.maskgit_abstract_state(config, generator, text, tx, mesh)
  assert set(abstract.params) == {"generator"}
  np.testing.assert_array_equal(frozen["text_encoder"]["token_embedder"]["embedding"],
                                params["token_embedder"]["embedding"])


# --- End to end from a tokenizer workdir.

def test_tiny_run_writes_checkpoints_metrics_and_records_the_tokenizer(uninterrupted,
                                                                      tokenizer_dir):
  workdir, out = uninterrupted
  assert out["step"] == 6
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3", "6"]
  losses = _losses(workdir)
  assert sorted(losses) == list(range(1, 7)) and all(np.isfinite(list(losses.values())))
  rows = metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  keys = set().union(*rows)
  for key in ("train/masked_accuracy", "train/video/loss", "train/image/loss",
              "train/story/loss", "train/prefix_fraction",
              "train/grad_norm", "train/learning_rate", "train/text_dropped_fraction",
              "train/by_r/00-25/loss", "eval/loss", "eval/ema/loss", "eval/no_text/loss"):
    assert key in keys, key
  assert not any(k.startswith("bucket_stats") for k in keys)
  record = tokenizer_lib.read_record(workdir)
  assert record == {"workdir": os.path.abspath(tokenizer_dir), "step": 1, "codebook_size": 64}
  # The byte encoder trains with the generator; the EMA trails both.
  state = jax.device_get(out["state"])
  assert set(state.params) == {"generator", "text_encoder"}
  assert not np.allclose(state.params["generator"]["to_logits"]["kernel"],
                         state.ema_params["generator"]["to_logits"]["kernel"])


def test_stop_and_resume_is_exact(uninterrupted, tokenizer_dir, tmp_path):
  whole, whole_out = uninterrupted
  workdir = str(tmp_path / "resumed")
  first = train_maskgit.train_and_evaluate(_tiny(tokenizer_dir), workdir, stop_after_step=4)
  assert first["step"] == 4
  second = train_maskgit.train_and_evaluate(_tiny(tokenizer_dir), workdir)
  assert second["step"] == 6
  want, got = _losses(whole), _losses(workdir)
  assert got == want  # bitwise on CPU, every step
  a, b = jax.device_get(second["state"]), jax.device_get(whole_out["state"])
  jax.tree.map(np.testing.assert_array_equal, (a.params, a.ema_params, a.opt_state),
               (b.params, b.ema_params, b.opt_state))

# --- Long-term memory (model.memory_token_frames; tests/train/maskgit_objective_test.py).

# Slow (~45 s): exact resume is test_stop_and_resume_is_exact's, and tests/conftest.py's
# memory_trained trains a memory generator for tests/sampling/story_test.py.
@pytest.mark.slow
def test_a_memory_generator_trains_checkpoints_and_resumes_exactly(tokenizer_dir, tmp_path):
  def config():
    c = _tiny(tokenizer_dir)
    c.model.memory_token_frames = 1
    return c
  whole, parts = str(tmp_path / "whole"), str(tmp_path / "parts")
  out = train_maskgit.train_and_evaluate(config(), whole)
  assert sorted(os.listdir(os.path.join(whole, "checkpoints"))) == ["3", "6"]
  rows = metrics.read_jsonl(os.path.join(whole, "metrics.jsonl"))
  keys = set().union(*rows)
  for key in ("train/memory_fraction", "train/story/loss", "train/video/loss", "eval/loss"):
    assert key in keys, key
  fractions = [r["train/memory_fraction"] for r in rows if "train/memory_fraction" in r]
  assert 0 < np.mean(fractions) < 1  # memory.drop_rate 0.5 (images never get one)
  assert "memory" in jax.device_get(out["state"]).params["generator"]
  # Stopped after step 4 and resumed: the same losses and weights, bit for bit.
  assert train_maskgit.train_and_evaluate(config(), parts, stop_after_step=4)["step"] == 4
  resumed = train_maskgit.train_and_evaluate(config(), parts)
  assert _losses(parts) == _losses(whole)
  a, b = jax.device_get(resumed["state"]), jax.device_get(out["state"])
  jax.tree.map(np.testing.assert_array_equal, (a.params, a.ema_params, a.opt_state),
               (b.params, b.ema_params, b.opt_state))


def test_memory_settings_are_checked_naming_the_key(tmp_path):
  for key, value, message in (("model.memory_token_frames", 3,
                               r"config.model.memory_token_frames=3: must be in \[0, 3\)"),
                              ("memory.drop_rate", 1.5, r"config.memory.drop_rate=1.5")):
    config = _tiny(str(tmp_path / "no_tokenizer"))
    _set(config, key, value)
    with pytest.raises(schema.ConfigError, match=message):
      train_maskgit.train_and_evaluate(config, str(tmp_path / "run"))
