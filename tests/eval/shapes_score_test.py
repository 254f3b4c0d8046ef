"""The shapes prompt scorer reads the dataset's own clips right, and wrong prompts wrong."""
import itertools

import numpy as np
import pytest

from phenaki_jax.data import synthetic
from phenaki_jax.eval import shapes_score


@pytest.mark.parametrize("resolution,num_frames", [(64, 11), (32, 11), (64, 5)])
def test_every_attribute_of_rendered_clips_is_read_right(resolution, num_frames):
  source = synthetic.ShapesVideoSource(num_frames, resolution, seed=11)
  scores = [shapes_score.score_clip(source[i]["frames"], source[i]["caption"])
            for i in range(200)]
  acc = shapes_score.accuracy(scores)
  assert acc == {"colour": 1.0, "shape": 1.0, "size": 1.0, "motion": 1.0, "all": 1.0,
                 "num_clips": 200.0}


def test_images_are_scored_without_motion():
  source = synthetic.ShapesImageSource(64, seed=2)
  scores = [shapes_score.score_clip(source[i]["frames"], source[i]["caption"]) for i in range(50)]
  assert all("motion" not in s and s["all"] for s in scores)


def _other(choices, value):
  return next(c for c in choices if c != value)


@pytest.mark.parametrize("attribute", ["colour", "shape", "size", "motion"])
def test_a_prompt_that_differs_in_one_attribute_fails_on_it_only(attribute):
  source = synthetic.ShapesVideoSource(11, 64, seed=5)
  choices = {"colour": tuple(synthetic.COLOURS), "shape": synthetic.SHAPES,
             "size": synthetic.SIZES, "motion": synthetic.MOTIONS}
  for i in range(40):
    spec = source.spec(i)
    fields = {"colour": spec.colour, "shape": spec.shape, "size": spec.size,
              "motion": spec.motion}
    fields[attribute] = _other(choices[attribute], fields[attribute])
    prompt = f"a {fields['size']} {fields['colour']} {fields['shape']} {fields['motion']}"
    score = shapes_score.score_clip(source[i]["frames"], prompt)
    assert not score[attribute] and not score["all"], (prompt, score)
    assert all(v for k, v in score.items() if k not in (attribute, "all")), (prompt, score)


def test_a_clip_without_an_object_is_wrong_on_everything():
  blank = np.zeros((11, 64, 64, 3), np.uint8)
  assert shapes_score.read_clip(blank).as_dict() == {
      "colour": None, "shape": None, "size": None, "motion": None, "area": None}
  assert shapes_score.score_clip(blank, "a small red circle moves left") == {
      "size": False, "colour": False, "shape": False, "motion": False, "all": False}


def test_prompt_set_is_balanced_and_fixed():
  prompts = shapes_score.prompt_set(210)
  parsed = [synthetic.parse_caption(p) for p in prompts]
  combos = {(p["colour"], p["shape"], p["size"], p["motion"]) for p in parsed}
  assert len(combos) == 210 == len(list(itertools.product(
      synthetic.COLOURS, synthetic.SHAPES, synthetic.SIZES, synthetic.MOTIONS)))
  assert shapes_score.prompt_set(30) == prompts[:30]
  assert shapes_score.prompt_set(5, seed=1) == prompts[1:6]


def test_accuracy_counts_each_attribute_over_the_clips_that_name_it():
  acc = shapes_score.accuracy([{"colour": True, "motion": False, "all": False},
                               {"colour": False, "all": False},
                               {"colour": True, "motion": True, "all": True}])
  assert acc["colour"] == pytest.approx(2 / 3) and acc["motion"] == 0.5
  assert acc["all"] == pytest.approx(1 / 3) and acc["num_clips"] == 3.0
  assert "shape" not in acc


def test_the_prompt_colour_object_is_judged_even_when_another_colour_dominates():
  small = synthetic.ShapesSpec("triangle", "red", "small", "moves left", (0.7, 0.3))
  large = synthetic.ShapesSpec("square", "blue", "large", "stays still", (0.3, 0.7))
  clip = np.maximum(synthetic.render_clip(small, 11, 64), synthetic.render_clip(large, 11, 64))
  score = shapes_score.score_clip(clip, "a small red triangle moves left")
  # Blue covers more pixels: the colour is wrong, the red object's shape,
  # size and motion are right.
  assert score == {"size": True, "colour": False, "shape": True, "motion": True, "all": False}
  assert shapes_score.score_clip(clip, "a large blue square stays still")["all"]


@pytest.mark.parametrize("resolution,num_frames", [(64, 11), (64, 1)])
def test_reference_clips_of_the_prompt_set_are_read_as_their_prompts(resolution, num_frames):
  prompts = shapes_score.prompt_set(30) + ["a small red circle", "a large blue square"]
  for prompt in prompts:
    clip = shapes_score.reference_clip(prompt, num_frames, resolution)
    assert clip.shape == (num_frames, resolution, resolution, 3) and clip.dtype == np.uint8
    if num_frames == 1 and "moves" in prompt:
      continue  # one frame cannot show a motion
    assert shapes_score.score_clip(clip, prompt)["all"], prompt


def test_a_story_prompt_has_no_reference_clip():
  assert shapes_score.reference_clip("the red circle moves left", 11, 64) is None


def test_area_ratios_are_one_on_the_dataset_and_measure_how_far_a_size_is_off():
  prompts = ["a small red circle moves left", "a large green square moves up",
             "a small blue triangle stays still", "a large yellow circle moves down"]

  def ratio(prompt, clip):
    return prompt, shapes_score.area_ratio(prompt, shapes_score.read_clip(clip), 11, 64)

  exact = [ratio(p, shapes_score.reference_clip(p, 11, 64)) for p in prompts]
  assert [r for _, r in exact] == [1.0] * 4
  assert shapes_score.mean_area_ratios(exact) == {"small": 1.0, "large": 1.0, "num_clips": 4.0}
  # A large object for a small prompt: the area of the wrong size, (1/3 ÷ 1/5)² ≈ 2.8×.
  drawn_large = shapes_score.reference_clip("a large red circle moves left", 11, 64)
  off = [ratio(prompts[0], drawn_large), ratio(prompts[1], np.zeros_like(drawn_large))]
  assert off[0][1] == pytest.approx((5 / 3) ** 2, rel=0.1) and off[1][1] == 0.0
  assert shapes_score.mean_area_ratios(off + [("a large red circle", None)]) == {
      "small": off[0][1], "large": 0.0, "num_clips": 2.0}
  assert ratio("the red circle moves left", drawn_large)[1] is None  # names no size
  assert shapes_score.mean_area_ratios([("a small red circle", None)]) is None
