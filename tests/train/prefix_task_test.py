"""The story task of the generator's training: a given prefix, the loss on the rest."""
import math

import jax
import numpy as np

from phenaki_jax.train import maskgit_objective
from phenaki_jax.train import loop as train_loop

T, H, W, V = 3, 4, 4, 64
MASK = V


def _inputs(n, prob, corrupt=0.0, real_frames=T, seed=0):
  codes = jax.random.randint(jax.random.key(seed), (n, real_frames, H, W), 0, V)
  tokens, region = maskgit_objective.pad_token_grid(codes, T, MASK)
  fn = jax.jit(lambda r: maskgit_objective.training_inputs(
      r, tokens, region, schedule="cosine", mask_id=MASK, codebook_size=V,
      prefix_probability=prob, prefix_corrupt_fraction=corrupt))
  inputs, masked, prefix = fn(train_loop.step_rng(0, 3))
  return np.asarray(tokens), np.asarray(inputs), np.asarray(masked), np.asarray(prefix)


def test_the_measured_prefix_rate_and_lengths():
  n = 4000
  _, _, _, prefix = _inputs(n, 0.25)
  used = prefix > 0
  assert abs(used.sum() - 0.25 * n) <= 3.5 * math.sqrt(n * 0.25 * 0.75), used.sum()
  # k ~ U{1, 2} of 3 token frames: never the whole clip.
  assert set(np.unique(prefix[used])) == {1, 2}
  assert abs((prefix[used] == 1).mean() - 0.5) < 0.06


def test_prefix_frames_are_given_whole_and_carry_no_loss():
  tokens, inputs, masked, prefix = _inputs(500, 1.0)
  frame = np.arange(T)[None, :, None, None]
  in_prefix = np.broadcast_to(frame < prefix[:, None, None, None], tokens.shape)
  assert not (masked & in_prefix).any()
  np.testing.assert_array_equal(inputs[in_prefix], tokens[in_prefix])
  # Every example still has something to predict after its prefix.
  assert masked.reshape(500, -1).any(axis=1).all()


def test_images_never_get_a_prefix_and_probability_zero_is_plain_maskgit():
  _, _, _, prefix = _inputs(300, 1.0, real_frames=1)
  assert not prefix.any()
  plain = _inputs(300, 0.0)
  np.testing.assert_array_equal(plain[3], 0)
  # The masks of examples without a prefix do not depend on the prefix task.
  with_task = _inputs(300, 0.5)
  same = with_task[3] == 0
  np.testing.assert_array_equal(with_task[2][same], plain[2][same])


def test_corruption_replaces_the_asked_fraction_of_context_tokens_only():
  tokens, inputs, masked, prefix = _inputs(2000, 1.0, corrupt=0.3)
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
