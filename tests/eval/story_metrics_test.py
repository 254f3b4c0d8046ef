"""Story metrics on rendered stories whose answers are known."""
import numpy as np

from phenaki_jax.data import synthetic
from phenaki_jax.eval import story_metrics


def _records(captions, starts, total):
  ends = list(starts[1:]) + [total]
  return [{"prompt": c, "start_frame": s, "end_frame": e, "window_starts": [s]}
          for c, s, e in zip(captions, starts, ends)]


def test_a_rendered_story_scores_perfectly_and_joins_smoothly():
  for seed in range(10):
    prompts = story_metrics.shapes_storyboard(4, seed)
    motions = [synthetic.parse_caption(p)["motion"] for p in prompts]
    first = synthetic.parse_caption(prompts[0])
    # 6-frame segments: the renderer can keep all four border-free to their
    # middles, so every caption holds where the scorer looks.
    video, captions, starts = synthetic.render_story(
        motions, 6, 64, seed=seed, shape=first["shape"], colour=first["colour"],
        size=first["size"])
    assert captions == prompts
    score = story_metrics.score_story(video, _records(captions, starts, len(video)))
    assert score["segment_accuracy"]["all"] == 1.0, score
    assert score["keeps_colour"] == 1.0 and score["keeps_shape"] == 1.0
    assert 0.5 < score["seam_ratio"] < 1.5, score["seam_ratio"]


def test_a_jump_between_windows_raises_the_seam_ratio_and_a_new_object_breaks_consistency():
  a, cap_a, _ = synthetic.render_story(["moves right", "moves up"], 10, 64, seed=1,
                                       shape="circle", colour="red", size="large")
  b, cap_b, _ = synthetic.render_story(["moves left", "moves down"], 10, 64, seed=2,
                                       shape="square", colour="blue", size="small")
  video = np.concatenate([a[:10], b[10:]])
  records = _records([cap_a[0], "the red circle moves down"], [0, 10], 20)
  score = story_metrics.score_story(video, records)
  assert score["seam_ratio"] > 3, score["seam_ratio"]
  assert score["keeps_colour"] == 0.0 and score["keeps_shape"] == 0.0
  assert score["segments"][1]["correct"]["colour"] is False


def test_storyboards_change_direction_every_segment():
  for seed in range(20):
    prompts = story_metrics.shapes_storyboard(6, seed)
    motions = [synthetic.parse_caption(p)["motion"] for p in prompts]
    assert all(a != b for a, b in zip(motions, motions[1:]))
    assert synthetic.STILL not in motions
    assert prompts[0].startswith("a ") and all(p.startswith("the ") for p in prompts[1:])
