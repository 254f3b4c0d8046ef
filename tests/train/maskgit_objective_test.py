"""The MaskGIT objective's story tasks (phenaki_jax/train/maskgit_objective.py).

The story prefix: The story task of the generator's training: a given prefix, the loss on the rest.

Long-term memory: Long-term memory in the generator's training: where it comes from, its drop rate, no leak.
"""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from phenaki_jax import train_state
from phenaki_jax.config import schema
from phenaki_jax.data import pipeline, synthetic
from phenaki_jax.text import encoder as text_encoder
from phenaki_jax.train import loop as train_loop
from phenaki_jax.train import maskgit_objective
from tests.helpers import load_config

T, H, W, V = 3, 4, 4, 64
MASK = V
M = 1  # memory token frames


# --- The story prefix.

def _prefix_inputs(n, prob, corrupt=0.0, real_frames=T, seed=0):
  codes = jax.random.randint(jax.random.key(seed), (n, real_frames, H, W), 0, V)
  tokens, region = maskgit_objective.pad_token_grid(codes, T, MASK)
  fn = jax.jit(lambda r: maskgit_objective.training_inputs(
      r, tokens, region, schedule="cosine", mask_id=MASK, codebook_size=V,
      prefix_probability=prob, prefix_corrupt_fraction=corrupt))
  inputs, masked, prefix = fn(train_loop.step_rng(0, 3))
  return np.asarray(tokens), np.asarray(inputs), np.asarray(masked), np.asarray(prefix)


def test_the_measured_prefix_rate_and_lengths():
  n = 4000
  _, _, _, prefix = _prefix_inputs(n, 0.25)
  used = prefix > 0
  assert abs(used.sum() - 0.25 * n) <= 3.5 * math.sqrt(n * 0.25 * 0.75), used.sum()
  # k ~ U{1, 2} of 3 token frames: never the whole clip.
  assert set(np.unique(prefix[used])) == {1, 2}
  assert abs((prefix[used] == 1).mean() - 0.5) < 0.06


def test_prefix_frames_are_given_whole_and_carry_no_loss():
  tokens, inputs, masked, prefix = _prefix_inputs(500, 1.0)
  frame = np.arange(T)[None, :, None, None]
  in_prefix = np.broadcast_to(frame < prefix[:, None, None, None], tokens.shape)
  assert not (masked & in_prefix).any()
  np.testing.assert_array_equal(inputs[in_prefix], tokens[in_prefix])
  # Every example still has something to predict after its prefix.
  assert masked.reshape(500, -1).any(axis=1).all()


def test_images_never_get_a_prefix_and_probability_zero_is_plain_maskgit():
  _, _, _, prefix = _prefix_inputs(300, 1.0, real_frames=1)
  assert not prefix.any()
  plain = _prefix_inputs(300, 0.0)
  np.testing.assert_array_equal(plain[3], 0)
  # The masks of examples without a prefix do not depend on the prefix task.
  with_task = _prefix_inputs(300, 0.5)
  same = with_task[3] == 0
  np.testing.assert_array_equal(with_task[2][same], plain[2][same])


def test_corruption_replaces_the_asked_fraction_of_context_tokens_only():
  tokens, inputs, masked, prefix = _prefix_inputs(2000, 1.0, corrupt=0.3)
  frame = np.arange(T)[None, :, None, None]
  in_prefix = np.broadcast_to(frame < prefix[:, None, None, None], tokens.shape)
  changed = (inputs != tokens) & in_prefix
  # A random code equals the original 1/V of the time.
  want = 0.3 * (1 - 1 / V)
  assert abs(changed.sum() / in_prefix.sum() - want) < 0.02
  outside = ~in_prefix & ~masked
  np.testing.assert_array_equal(inputs[outside], tokens[outside])


# --- Built-in story clips for the story task.

def test_story_clips_change_motion_after_their_context_and_follow_the_new_caption():
  from phenaki_jax.data import synthetic
  from phenaki_jax.eval import shapes_score
  source = synthetic.ShapesStorySource(11, 64, (1, 3, 5, 7, 9), seed=4)
  ks = []
  for i in range(100):
    e = source[i]
    k = int(e["prefix_frames"])
    ks.append(k)
    assert e["caption"].startswith("the ")
    assert shapes_score.score_clip(e["frames"][k:], e["caption"])["all"], (i, e["caption"])
    before = shapes_score.read_clip(e["frames"][:k + 1]).motion if k >= 2 else None
    assert before != synthetic.parse_caption(e["caption"])["motion"]
  assert set(ks) == {1, 3, 5, 7, 9}


def test_the_measured_share_of_story_batches():
  from phenaki_jax.config import schema
  from phenaki_jax.data import pipeline
  from tests.helpers import load_config
  config = schema.complete(load_config("maskgit", "tiny"))
  it = iter(pipeline.make_train_dataset(config.input, seed=0, keep_caption=True))
  kinds = []
  for _ in range(200):
    batch = next(it)
    kinds.append("story" if "prefix_frames" in batch else
                 ("video" if batch["frames"].shape[1] > 1 else "image"))
  # video_ratio 0.8, of which story_ratio 0.25: 60% video, 20% story, 20% image batches.
  assert (kinds.count("video"), kinds.count("story"), kinds.count("image")) == (120, 40, 40)


# --- Long-term memory.

def _tokens(n, real_frames=T, seed=0):
  codes = jax.random.randint(jax.random.key(seed), (n, real_frames, H, W), 0, V)
  return maskgit_objective.pad_token_grid(codes, T, MASK)


def _memory(n, drop_rate, real_frames=T, given=None, step=3):
  tokens, region = _tokens(n, real_frames)
  # The rng as compute_losses derives it from the step's.
  rng = jax.random.fold_in(train_loop.step_rng(0, step), 3)
  out = jax.jit(lambda r: maskgit_objective.memory_inputs(
      r, tokens, region, memory_token_frames=M, drop_rate=drop_rate, given=given))(rng)
  return (np.asarray(tokens), np.asarray(region)) + tuple(
      None if x is None else np.asarray(x) for x in out)


def _binomial_ok(count, n, p, sigmas=3.5):
  return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


def test_the_measured_memory_drop_rate():
  n = 4000
  for rate in (0.5, 0.2):
    _, _, _, present, _ = _memory(n, rate)
    assert _binomial_ok(int((~present).sum()), n, rate), ((~present).sum(), rate)
  # Fresh draws every step.
  patterns = {tuple(_memory(16, 0.5, step=s)[3]) for s in range(20)}
  assert len(patterns) > 10
  assert _memory(300, 0.0)[3].all() and not _memory(300, 1.0)[3].any()


def test_own_memory_is_the_first_token_frames_and_images_get_none():
  tokens, _, memory, present, own = _memory(200, 0.0)
  np.testing.assert_array_equal(memory, tokens[:, :M])
  np.testing.assert_array_equal(own, np.where(present, M, 0))
  # An image (one real token frame) would keep nothing to learn after its memory.
  _, _, _, present, own = _memory(200, 0.0, real_frames=1)
  assert not present.any() and not own.any()


def test_a_given_memory_is_used_as_is_and_hides_nothing():
  given = jnp.full((100, M, H, W), 7, jnp.int32)
  _, _, memory, present, own = _memory(100, 0.5, real_frames=1, given=given)
  np.testing.assert_array_equal(memory, 7)
  assert own is None
  assert 0 < present.sum() < 100  # still dropped at the rate, images included


def _memory_task_inputs(n, prefix_probability, own):
  tokens, region = _tokens(n)
  fn = jax.jit(lambda r, o: maskgit_objective.training_inputs(
      r, tokens, region, schedule="cosine", mask_id=MASK, codebook_size=V,
      prefix_probability=prefix_probability, memory_frames=o))
  inputs, masked, prefix = fn(train_loop.step_rng(0, 5), own)
  return np.asarray(tokens), np.asarray(inputs), np.asarray(masked), np.asarray(prefix)


def test_own_memory_frames_are_hidden_in_the_input_and_outside_the_loss():
  n = 1000
  own = jnp.asarray(np.where(np.arange(n) % 2 == 0, M, 0), jnp.int32)
  tokens, inputs, masked, prefix = _memory_task_inputs(n, 0.5, own)
  with_memory = np.asarray(own) > 0
  first = np.s_[:, :M]
  # Memory frames never carry loss, and are [MASK] unless the prefix gives them anyway.
  assert not masked[with_memory][first].any()
  no_prefix = with_memory & (prefix == 0)
  assert (inputs[no_prefix][first] == MASK).all()
  given = with_memory & (prefix > 0)
  assert given.any()
  np.testing.assert_array_equal(inputs[given][first], tokens[given][first])
  # Every example still has tokens to learn, after its memory and its prefix.
  assert masked.reshape(n, -1).any(axis=1).all()
  # Examples without memory are masked exactly as without the memory task.
  _, plain_inputs, plain_masked, plain_prefix = _memory_task_inputs(n, 0.5, None)
  np.testing.assert_array_equal(plain_prefix, prefix)
  np.testing.assert_array_equal(plain_masked[~with_memory], masked[~with_memory])
  np.testing.assert_array_equal(plain_inputs[~with_memory], inputs[~with_memory])


# --- Story clips carry frames of their object, rendered apart.

def test_story_clips_with_memory_hold_their_object_rendered_apart():
  from phenaki_jax.eval import shapes_score
  plain = synthetic.ShapesStorySource(11, 64, (1, 3, 5), seed=4)
  source = synthetic.ShapesStorySource(11, 64, (1, 3, 5), seed=4, memory_frames=1)
  for i in range(30):
    e = source[i]
    k = int(e["prefix_frames"])
    assert e["frames"].shape == (11, 64, 64, 3) and e["memory_frames"].shape == (1, 64, 64, 3)
    assert shapes_score.score_clip(e["frames"][k:], e["caption"])["all"], (i, e["caption"])
    # The same object as the clip, elsewhere.
    wanted = synthetic.parse_caption(e["caption"])
    seen = shapes_score.read_clip(e["memory_frames"], wanted["colour"])
    assert (seen.colour, seen.shape) == (wanted["colour"], wanted["shape"])
    # The clip is the one without memory, draw for draw.
    p = plain[i]
    assert "memory_frames" not in p and (p["caption"], p["prefix_frames"]) == (e["caption"], k)
    np.testing.assert_array_equal(p["frames"], e["frames"])


def test_story_batches_carry_memory_frames_augmented_like_their_clip():
  config = schema.complete(load_config("maskgit", "tiny"))
  it = iter(pipeline.make_train_dataset(config.input, seed=0, keep_caption=True,
                                        story_memory_frames=1))
  kinds = set()
  for _ in range(20):
    batch = next(it)
    story = "prefix_frames" in batch
    kinds.add(story)
    assert ("memory_frames" in batch) == story
    if story:
      assert batch["memory_frames"].shape == (8, 1, 16, 16, 3)
  assert kinds == {True, False}
  # One crop and flip for the clip and its memory.
  frames = np.random.default_rng(0).integers(0, 255, (5, 16, 16, 3), np.uint8)
  element = {"frames": frames, "memory_frames": frames[:1].copy()}
  out = pipeline.ClipAugment(0.5, True).random_map(element, np.random.default_rng(3))
  np.testing.assert_array_equal(out["memory_frames"][0], out["frames"][0])
  assert not np.array_equal(out["frames"], frames)


# --- The loss: unchanged with memory off, memory through compute_losses when on.

def _setup(memory_token_frames):
  config = schema.complete(load_config("maskgit", "tiny"))
  config.model.memory_token_frames = memory_token_frames
  generator = train_state.build_maskgit(config)
  text = text_encoder.build_text_encoder(config.text)
  init = train_state.maskgit_init_fn(generator, text, optax.sgd(0.1), config)
  params = jax.jit(lambda r: nn.unbox(init(r)).params)(jax.random.key(0))
  rng = np.random.default_rng(1)
  ids, mask = text.tokenizer.encode_batch(["a red circle moves left"] * 8, 40)
  batch = {"codes": jnp.asarray(rng.integers(0, V, (8, T, H, W)), jnp.int32),
           "text_ids": jnp.asarray(ids), "text_mask": jnp.asarray(mask),
           "token_frames": jnp.asarray([3, 3, 3, 3, 1, 1, 3, 3], jnp.int32)}
  return generator, text, params, batch


def test_with_memory_off_the_loss_is_the_recipe_of_before():
  generator, text, params, batch = _setup(0)
  rng = train_loop.step_rng(0, 4)
  kw = dict(text_drop_rate=0.3, label_smoothing=0.1, schedule="cosine", prefix_probability=0.5)
  loss, parts = jax.jit(lambda p: maskgit_objective.compute_losses(
      generator, text, p, {}, batch, batch["codes"], rng, **kw))(params)
  assert "train/memory_fraction" not in parts

  def before(p):  # the steps of compute_losses before the memory existed
    tokens, region = maskgit_objective.pad_token_grid(batch["codes"], T, MASK, batch["token_frames"])
    inputs, masked, _ = maskgit_objective.training_inputs(
        rng, tokens, region, schedule="cosine", mask_id=MASK, codebook_size=V,
        prefix_probability=0.5)
    context, context_mask = text_encoder.encode_text(text, p, {}, batch)
    dropped = maskgit_objective.text_drop_mask(maskgit_objective.split_step_rng(rng)[1], 8, 0.3)
    logits = generator.apply({"params": p["generator"]}, inputs, context,
                             context_mask & ~dropped[:, None])
    ce, _ = maskgit_objective.token_cross_entropy(logits, jnp.where(region, tokens, 0), 0.1)
    weight = masked.astype(jnp.float32)
    return jnp.sum(ce * weight) / jnp.maximum(jnp.sum(weight), 1.0)

  assert float(loss) == float(jax.jit(before)(params))


def test_with_memory_on_the_loss_sees_the_memory_and_reports_its_rate():
  generator, text, params, batch = _setup(1)
  assert "memory" in params["generator"]
  rng = train_loop.step_rng(0, 4)

  def loss(p, b, rate):
    return maskgit_objective.compute_losses(generator, text, p, {}, b, b["codes"], rng,
                                        text_drop_rate=0.0, label_smoothing=0.0,
                                        schedule="cosine", memory_drop_rate=rate)
  loss = jax.jit(loss)
  _, kept = loss(params, batch, 0.0)
  # Six of the eight are clips (two are images, never given their own memory).
  assert float(kept["train/memory_fraction"]) == 6 / 8
  _, dropped = loss(params, batch, 1.0)
  assert float(dropped["train/memory_fraction"]) == 0.0
  # A given memory (a story clip's) changes the loss; dropped, it cannot.
  a = dict(batch, memory_codes=jnp.zeros((8, 1, H, W), jnp.int32))
  b = dict(batch, memory_codes=jnp.full((8, 1, H, W), 5, jnp.int32))
  assert float(loss(params, a, 0.0)[0]) != float(loss(params, b, 0.0)[0])
  assert float(loss(params, a, 1.0)[0]) == float(loss(params, b, 1.0)[0])


def test_mask_ratio_and_its_buckets_count_only_the_tokens_the_mask_could_take():
  """A prefix is context: train/mask_ratio and the per-r buckets divide by the rest."""
  generator, text, params, batch = _setup(0)
  rng = train_loop.step_rng(0, 4)
  _, parts = jax.jit(lambda p: maskgit_objective.compute_losses(
      generator, text, p, {}, batch, batch["codes"], rng, text_drop_rate=0.0,
      label_smoothing=0.0, schedule="cosine", prefix_probability=1.0))(params)
  # The same draws, recomputed: the masked share of each example's tokens after its prefix.
  tokens, region = maskgit_objective.pad_token_grid(batch["codes"], T, MASK, batch["token_frames"])
  _, masked, prefix = maskgit_objective.training_inputs(
      rng, tokens, region, schedule="cosine", mask_id=MASK, codebook_size=V,
      prefix_probability=1.0)
  masked, prefix, region = np.asarray(masked), np.asarray(prefix), np.asarray(region)
  assert (prefix[np.asarray(batch["token_frames"]) > 1] > 0).all()  # every clip has a prefix
  after = region & (np.arange(T)[None, :, None, None] >= prefix[:, None, None, None])
  share = masked.sum((1, 2, 3)) / after.sum((1, 2, 3))
  np.testing.assert_allclose(float(parts["train/mask_ratio"]), share.mean(), rtol=1e-6)
  # Each example's masked tokens land in the bucket of the r its share came from.
  r = np.arccos(np.clip(share, 0, 1)) * 2 / math.pi
  bucket = np.clip(np.floor(r * len(maskgit_objective.R_BUCKETS)), 0,
                   len(maskgit_objective.R_BUCKETS) - 1).astype(int)
  for k, name in enumerate(maskgit_objective.R_BUCKETS):
    want = masked.sum((1, 2, 3))[bucket == k].sum()
    assert float(parts[f"bucket_stats/{name}/count"]) == want, name
