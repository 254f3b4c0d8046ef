"""Token statistics: which tokens are object, and the entropies of their codes."""
import numpy as np
import pytest

from phenaki_jax.data import synthetic
from phenaki_jax.eval import token_stats


def test_object_mask_marks_exactly_the_tubelets_with_lit_pixels():
  clips = np.zeros((2, 5, 16, 16, 3), np.uint8)
  clips[0, 0, 9, 2] = 255     # frame 0 -> token frame 0, row 2, col 0
  clips[0, 4, 3, 15, 1] = 40  # frame 4 -> token frame 2 (frames 3-4), row 0, col 3
  clips[1, 1, 0, 0] = 7       # below the black level: still background
  mask = token_stats.object_token_mask(clips, patch_size=4, temporal_patch_size=2)
  assert mask.shape == (2, 3, 4, 4)
  expected = np.zeros_like(mask)
  expected[0, 0, 2, 0] = expected[0, 2, 0, 3] = True
  np.testing.assert_array_equal(mask, expected)


def test_object_mask_of_a_rendered_clip_follows_the_object():
  spec = synthetic.ShapesSpec(shape="square", colour="red", size="large", motion="moves right",
                              start=(0.25, 0.5))
  clip = synthetic.render_clip(spec, 5, 64)[None]
  mask = token_stats.object_token_mask(clip, patch_size=8, temporal_patch_size=2)
  assert mask.any(axis=(2, 3)).all()  # the object is in every token frame
  cols = [np.nonzero(mask[0, k].any(axis=0))[0].mean() for k in range(3)]
  assert cols[0] < cols[2]  # and moves right


def test_object_mask_refuses_clips_that_do_not_tile():
  with pytest.raises(ValueError, match="do not tile"):
    token_stats.object_token_mask(np.zeros((1, 4, 16, 16, 3), np.uint8), 4, 2)


def test_code_statistics_separate_noise_at_a_position_from_codes_that_vary_by_position():
  is_object = np.zeros((4, 1, 1, 2), bool)
  is_object[:, 0, 0, 1] = [True, True, False, False]
  codes = np.zeros((4, 1, 1, 2), np.int32)
  codes[:, 0, 0, 0] = 5                  # position 0: always code 5
  codes[:, 0, 0, 1] = [100, 101, 6, 6]  # position 1: two object codes, background code 6
  stats = token_stats.code_statistics(codes, is_object)
  assert stats["background_fraction"] == pytest.approx(6 / 8)
  assert stats["background_codes"] == 2
  p = np.array([4, 2]) / 6
  assert stats["background_entropy"] == pytest.approx(-(p * np.log(p)).sum())
  assert stats["background_entropy_given_position"] == pytest.approx(0.0)
  assert stats["object_codes"] == 2 and stats["object_entropy"] == pytest.approx(np.log(2))
  codes[:, 0, 0, 0] = [5, 7, 5, 7]       # now noise at a fixed position
  noisy = token_stats.code_statistics(codes, is_object)
  assert noisy["background_entropy_given_position"] == pytest.approx(np.log(2) * 4 / 6)
