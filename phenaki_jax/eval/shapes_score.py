"""Does a generated clip show what its built-in "shapes" prompt asks for?

A prompt of the built-in dataset ("a small red circle moves left") names four
attributes; this module reads each of them back from pixels and compares:

  * colour: every pixel is binarised per channel (> 127); the seven colours of
    the dataset are exactly the seven non-black binary codes, so the clip's
    colour is the most frequent non-black code over the clip; it must be the
    prompt's. The other attributes are read from the object of the prompt's
    colour (from the clip's colour when there is none);
  * shape: the object's pixels fill its bounding box by about 1 (square),
    π/4 (circle) or 1/2 (triangle, base and height equal), frame by frame;
  * size: the bounding box side over the frame side, against the midpoint of
    the dataset's 1/5 (small) and 1/3 (large);
  * motion: the displacement of the object's centroid over the first half of
    the clip (the dataset keeps the caption's direction at least that long),
    against half the distance the dataset moves an object in that time.

Besides the verdicts, `area_ratio` says how far off the size is: the object's
pixel area over that of the dataset's own clip for the prompt, by the size
the prompt names. A generator that draws small objects smaller than large
ones, but both too large, reads as "large" on both; the ratios show it.

It needs frames large enough to tell a triangle from a circle (the default
64×64; at 16×16 a small object is 3 pixels wide). On the dataset's own clips
it is right on every attribute (tested); on generated clips, a frame with no
object of a palette colour scores wrong on everything.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Iterable, Sequence

import numpy as np

from phenaki_jax.data import synthetic

ATTRIBUTES = ("colour", "shape", "size", "motion")
# Binary (r, g, b) code -> colour name; (0, 0, 0) is the background.
_CODE_TO_COLOUR = {tuple(int(c > 127) for c in rgb): name
                   for name, rgb in synthetic.COLOURS.items()}
# Fill ratio of the bounding box: square 1, circle π/4 ≈ 0.785, triangle 0.5;
# boundaries halfway between.
_SQUARE_ABOVE = 0.89
_TRIANGLE_BELOW = 0.64
_LARGE_ABOVE = 0.5 * (synthetic.SIZE_FRACTION["small"] + synthetic.SIZE_FRACTION["large"])
# A clip "moves" when its centroid travels this share of what the dataset's
# motion covers in the same frames.
_MOVING_SHARE = 0.5
# Fewer object pixels than this in a frame: no object in that frame.
_MIN_PIXELS = 4


@dataclasses.dataclass(frozen=True)
class ClipReading:
  """What the clip shows; None where it cannot be read (no object)."""
  colour: str | None
  shape: str | None
  size: str | None
  motion: str | None
  # Median over frames of the object's pixels, as a share of the frame.
  area: float | None = None

  def as_dict(self) -> dict[str, str | float | None]:
    return dataclasses.asdict(self)


def _codes(frames: np.ndarray) -> np.ndarray:
  """(T, H, W, 3) uint8 -> (T, H, W) int code r·4 + g·2 + b of the binarised pixels."""
  bits = (np.asarray(frames) > 127).astype(np.int32)
  return bits[..., 0] * 4 + bits[..., 1] * 2 + bits[..., 2]


def _code_of(colour: str) -> int:
  r, g, b = (int(c > 127) for c in synthetic.COLOURS[colour])
  return r * 4 + g * 2 + b


def read_clip(frames: np.ndarray, colour: str | None = None) -> ClipReading:
  """Colour, shape, size and motion of the object in uint8 frames (T, H, W, 3).

  The clip's colour is its most frequent non-black colour. Shape, size and
  motion are read from the pixels of `colour` when given and present (the
  prompt's object, so those attributes are judged even when another colour
  dominates), else from the clip's colour.
  """
  frames = np.asarray(frames)
  if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
    raise ValueError(f"frames must be uint8 (T, H, W, 3); got {frames.dtype} {frames.shape}")
  t, h, w, _ = frames.shape
  codes = _codes(frames)
  counts = np.bincount(codes.ravel(), minlength=8)
  counts[0] = 0  # background
  if counts.max() < _MIN_PIXELS:
    return ClipReading(None, None, None, None)
  code = int(counts.argmax())
  seen_colour = _CODE_TO_COLOUR[((code >> 2) & 1, (code >> 1) & 1, code & 1)]
  if colour is not None and counts[_code_of(colour)] >= _MIN_PIXELS:
    code = _code_of(colour)
  mask = codes == code

  fills, sides, centroids, areas = [], [], [], []
  for f in range(t):
    ys, xs = np.nonzero(mask[f])
    if len(xs) < _MIN_PIXELS:
      centroids.append(None)
      continue
    areas.append(len(xs) / float(h * w))
    box_w, box_h = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
    fills.append(len(xs) / float(box_w * box_h))
    sides.append(max(box_w, box_h) / float(max(h, w)))
    centroids.append((xs.mean(), ys.mean()))
  fill, side = float(np.median(fills)), float(np.median(sides))
  shape = "square" if fill > _SQUARE_ABOVE else ("triangle" if fill < _TRIANGLE_BELOW
                                                 else "circle")
  size = "large" if side > _LARGE_ABOVE else "small"
  motion = _motion(centroids, max(h, w)) if t > 1 else synthetic.STILL
  return ClipReading(seen_colour, shape, size, motion, float(np.median(areas)))


def _motion(centroids: Sequence[tuple[float, float] | None], side: int) -> str | None:
  half = math.ceil((len(centroids) - 1) / 2)  # the middle frame, as the dataset counts it
  first, middle = centroids[0], centroids[half]
  if first is None or middle is None:
    return None
  dx, dy = middle[0] - first[0], middle[1] - first[1]
  expected = synthetic.speed(side) * half
  if max(abs(dx), abs(dy)) < _MOVING_SHARE * expected:
    return synthetic.STILL
  if abs(dx) >= abs(dy):
    return "moves right" if dx > 0 else "moves left"
  return "moves down" if dy > 0 else "moves up"


def score_clip(frames: np.ndarray, prompt: str) -> dict[str, bool]:
  """Per attribute the prompt names: does the clip show it? Plus 'all'.

  A still-image prompt (no motion) is not scored on motion; a story prompt
  ("the red circle moves left") names no size.
  """
  return score_reading(read_prompt_object(frames, prompt), prompt)


def read_prompt_object(frames: np.ndarray, prompt: str) -> ClipReading:
  """`read_clip` of the object of the prompt's colour."""
  return read_clip(frames, colour=synthetic.parse_caption(prompt)["colour"])


def score_reading(reading: ClipReading, prompt: str) -> dict[str, bool]:
  """`score_clip` from a reading already taken with `read_prompt_object`."""
  seen = reading.as_dict()
  out = {k: seen[k] == v for k, v in synthetic.parse_caption(prompt).items() if v is not None}
  out["all"] = all(out.values())
  return out


def accuracy(scores: Iterable[dict[str, bool]]) -> dict[str, float]:
  """Mean of each key over clips (attributes a prompt did not name are left out)."""
  scores = list(scores)
  keys = [k for k in (*ATTRIBUTES, "all") if any(k in s for s in scores)]
  out = {}
  for k in keys:
    values = [s[k] for s in scores if k in s]
    out[k] = float(np.mean(values))
  out["num_clips"] = float(len(scores))
  return out


def prompt_set(count: int = 30, seed: int = 0) -> list[str]:
  """A fixed, balanced list of video prompts: every colour, shape, size and motion.

  Attributes cycle with co-prime periods (7 colours, 3 shapes, 2 sizes,
  5 motions), so any 210 consecutive prompts are all the combinations once;
  `seed` rotates where the cycle starts.
  """
  out = []
  colours = tuple(synthetic.COLOURS)
  for i in range(seed, seed + count):
    out.append(synthetic.caption_for(synthetic.ShapesSpec(
        shape=synthetic.SHAPES[i % 3], colour=colours[i % 7], size=synthetic.SIZES[i % 2],
        motion=synthetic.MOTIONS[i % 5], start=(0.5, 0.5))))
  return out


def reference_clip(prompt: str, num_frames: int, resolution: int) -> np.ndarray | None:
  """The dataset's own clip for `prompt`, starting at the frame centre; None without a size.

  Scoring a tokenizer's reconstruction of these clips gives the ceiling a
  generator on that tokenizer can reach: an outline the tokenizer rounds off
  is lost before the generator sees it. A still-image prompt gives a still
  object; a story prompt ("the red circle moves left") names no size: None.
  """
  wanted = synthetic.parse_caption(prompt)
  if wanted["size"] is None:
    return None
  spec = synthetic.ShapesSpec(shape=wanted["shape"], colour=wanted["colour"],
                              size=wanted["size"], motion=wanted["motion"] or synthetic.STILL,
                              start=(0.5, 0.5))
  return synthetic.render_clip(spec, num_frames, resolution)


def area_ratio(prompt: str, reading: ClipReading, num_frames: int,
               resolution: int) -> float | None:
  """The read object's area over that of `reference_clip(prompt)`.

  A clip with no object of any colour gives 0. None for a prompt without a
  size, or where the reference object is too small to read.
  """
  reference = reference_clip(prompt, num_frames, resolution)
  if reference is None:
    return None
  truth = read_clip(reference, synthetic.parse_caption(prompt)["colour"]).area
  return (reading.area or 0.0) / truth if truth else None


def mean_area_ratios(ratios: Iterable[tuple[str, float | None]]) -> dict[str, float] | None:
  """{"small", "large", "num_clips"}: the mean `area_ratio` per prompt size (Nones left out).

  None when no ratio is left.
  """
  by_size: dict[str, list[float]] = {size: [] for size in synthetic.SIZES}
  for prompt, ratio in ratios:
    if ratio is not None:
      by_size[synthetic.parse_caption(prompt)["size"]].append(ratio)
  if not any(by_size.values()):
    return None
  out = {size: float(np.mean(v)) for size, v in by_size.items() if v}
  out["num_clips"] = float(sum(len(v) for v in by_size.values()))
  return out


def is_shapes_prompt(prompt: str) -> bool:
  try:
    synthetic.parse_caption(prompt)
  except ValueError:
    return False
  return True
