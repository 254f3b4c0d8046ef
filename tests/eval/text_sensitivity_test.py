"""The text-sensitivity probe: swapped captions differ in one attribute; a text-blind model scores 0."""
import dataclasses

import jax
import numpy as np
import pytest

from phenaki_jax.data import synthetic
from phenaki_jax.eval import text_sensitivity


def test_swapped_captions_differ_from_the_true_ones_in_exactly_that_attribute():
  specs, clips = text_sensitivity.held_out_clips(40, 5, 16, seed=0)
  assert clips.shape == (40, 5, 16, 16, 3) and clips.dtype == np.uint8
  rng = np.random.default_rng(0)
  for attribute, values in text_sensitivity.ATTRIBUTES.items():
    swapped = text_sensitivity.swapped_specs(specs, attribute, rng)
    seen = set()
    for before, after in zip(specs, swapped):
      a = synthetic.parse_caption(synthetic.caption_for(before))
      b = synthetic.parse_caption(synthetic.caption_for(after))
      assert a[attribute] != b[attribute] and b[attribute] in values
      assert {k for k in a if a[k] != b[k]} == {attribute}
      seen.add(b[attribute])
    assert len(seen) > 1  # drawn, not one fixed replacement


def _text_blind(gen):
  """The generator with every cross-attention output zeroed: text cannot reach the logits."""
  def zero(path, x):
    return np.zeros_like(x) if any("cross" in str(getattr(k, "key", "")) for k in path) else x
  params = dict(gen.params)
  params["generator"] = jax.tree_util.tree_map_with_path(zero, gen.params["generator"])
  return dataclasses.replace(gen, params=params)


def test_a_text_blind_generator_is_insensitive_to_every_word_and_a_trained_one_is_not(generator):
  blind = text_sensitivity.measure(_text_blind(generator), num_clips=8, mask_ratios=(1.0,))
  row = blind["mask_1"]
  assert np.isfinite(row["nll_true"]) and row["nll_true"] > 0
  for key in (*text_sensitivity.ATTRIBUTES, "none"):
    assert row[key] == pytest.approx(0.0, abs=1e-6), key
  seeing = text_sensitivity.measure(generator, num_clips=8, mask_ratios=(0.5, 1.0))
  assert set(seeing) == {"mask_0.5", "mask_1"}
  assert any(abs(seeing["mask_1"][k]) > 1e-4 for k in (*text_sensitivity.ATTRIBUTES, "none"))


def test_only_masked_tokens_whose_pixels_are_not_black_are_scored(generator, monkeypatch):
  calls = []
  real = text_sensitivity.token_stats.object_token_mask

  def spy(clips, patch_size, temporal_patch_size):
    calls.append((clips.copy(), patch_size, temporal_patch_size))
    return real(clips, patch_size, temporal_patch_size)

  monkeypatch.setattr(text_sensitivity.token_stats, "object_token_mask", spy)
  objects_only = text_sensitivity.measure(generator, num_clips=8, mask_ratios=(1.0,))
  # The mask comes from the measured clips' pixels, tiled as the tokenizer tiles them.
  (clips, patch, temporal), = calls
  _, expected = text_sensitivity.held_out_clips(8, generator.num_frames,
                                                int(generator.config.input.resolution), seed=0)
  np.testing.assert_array_equal(clips, expected)
  m = generator.tokenizer.config.model
  assert (patch, temporal) == (m.patch_size, m.temporal_patch_size)
  # ... and it decides which tokens are averaged: scoring every token gives another figure.
  monkeypatch.setattr(text_sensitivity.token_stats, "object_token_mask",
                      lambda c, p, t: np.ones_like(real(c, p, t)))
  every_token = text_sensitivity.measure(generator, num_clips=8, mask_ratios=(1.0,))
  assert abs(every_token["mask_1"]["nll_true"] - objects_only["mask_1"]["nll_true"]) > 1e-3
