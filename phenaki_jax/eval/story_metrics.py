"""How well a generated story follows its storyboard, from pixels.

For stories in the built-in shapes grammar (first prompt "a {size} {colour}
{shape} {motion}", later ones "the {colour} {shape} {motion}"):

  * segment accuracy: the shapes scorer on each segment's own frames;
  * consistency: whether each later segment shows the first segment's
    object (the colour and shape the scorer reads there);
  * seam ratio: the mean absolute frame-to-frame change across the frames
    where a new window starts (segment boundaries and windows inside a
    segment alike), over the mean change between frames of one window. A
    story whose windows join like the frames inside them scores about 1;
    jumps at the seams score higher.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from phenaki_jax.data import synthetic
from phenaki_jax.eval import shapes_score


def shapes_storyboard(num_segments: int, seed: int) -> list[str]:
  """A story prompt list: one object, a new direction each segment (never the same twice in a row)."""
  rng = np.random.default_rng(seed)
  colour = tuple(synthetic.COLOURS)[rng.integers(len(synthetic.COLOURS))]
  shape = synthetic.SHAPES[rng.integers(len(synthetic.SHAPES))]
  size = synthetic.SIZES[rng.integers(len(synthetic.SIZES))]
  moving = [m for m in synthetic.MOTIONS if m != synthetic.STILL]
  motions = [moving[rng.integers(len(moving))]]
  while len(motions) < num_segments:
    motions.append([m for m in moving if m != motions[-1]][rng.integers(len(moving) - 1)])
  return ([f"a {size} {colour} {shape} {motions[0]}"]
          + [f"the {colour} {shape} {m}" for m in motions[1:]])


def seam_ratio(video: np.ndarray, window_starts: Sequence[int]) -> float:
  """Mean |Δframe| at window starts over the mean |Δframe| elsewhere (NaN if undefined)."""
  video = np.asarray(video, np.float32)
  if len(video) < 3:
    return float("nan")
  change = np.abs(np.diff(video, axis=0)).mean(axis=(1, 2, 3))  # change[i]: frame i -> i+1
  seams = sorted({s - 1 for s in window_starts if 1 <= s < len(video)})
  inside = np.ones(len(change), bool)
  inside[seams] = False
  if not seams or not inside.any() or change[inside].mean() == 0:
    return float("nan")
  return float(change[seams].mean() / change[inside].mean())


def score_story(video: np.ndarray, segments: Sequence[dict[str, Any]]) -> dict[str, Any]:
  """Per-segment scores and the story's summary; `segments` as generate_story records them."""
  per_segment, first = [], None
  for seg in segments:
    frames = video[seg["start_frame"]:seg["end_frame"]]
    wanted = synthetic.parse_caption(seg["prompt"])
    reading = shapes_score.read_clip(frames, wanted["colour"])
    correct = shapes_score.score_clip(frames, seg["prompt"])
    if first is None:
      first = reading
    per_segment.append({"prompt": seg["prompt"], "correct": correct,
                        "same_colour": reading.colour == first.colour and first.colour is not None,
                        "same_shape": reading.shape == first.shape and first.shape is not None})
  starts = [s for seg in segments for s in seg.get("window_starts", [seg["start_frame"]])]
  later = per_segment[1:]
  return {
      "segments": per_segment,
      "segment_accuracy": shapes_score.accuracy([s["correct"] for s in per_segment]),
      "keeps_colour": float(np.mean([s["same_colour"] for s in later])) if later else 1.0,
      "keeps_shape": float(np.mean([s["same_shape"] for s in later])) if later else 1.0,
      "seam_ratio": seam_ratio(video, starts),
  }
