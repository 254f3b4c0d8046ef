"""Built-in synthetic "shapes" text-video / text-image data.

One coloured shape on a black background, captioned with its size, colour,
shape and (for videos) motion, e.g. "a small red circle moves left". Every
example is a pure function of (seed, index), so the sources are random-access,
need no download, and are picklable for grain's spawned workers.

Geometry, in units of the frame side S (frames are square):
  * size: "small" has a diameter of S/5, "large" of S/3 (circle diameter,
    square side, triangle base and height);
  * speed: S/20 pixels per frame, so a moving object covers half the frame over
    the 10 steps of an 11-frame clip, whatever the clip length;
  * the start position is drawn so the object does not touch a border before
    the middle of the clip (the caption's direction holds at least that long);
    afterwards it bounces off the borders and always stays fully in frame.

Positions are sub-pixel; edges are anti-aliased by pixel coverage, while
interior pixels carry exactly the caption's RGB colour.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Sequence

import numpy as np

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "magenta": (255, 0, 255),
    "cyan": (0, 255, 255),
    "white": (255, 255, 255),
}
SIZES: tuple[str, ...] = ("small", "large")
MOTIONS: tuple[str, ...] = (
    "moves left", "moves right", "moves up", "moves down", "stays still")
STILL = "stays still"

# Diameter as a fraction of the frame side.
SIZE_FRACTION: dict[str, float] = {"small": 1 / 5, "large": 1 / 3}
# Pixels per frame as a fraction of the side: half the frame in 10 steps.
SPEED_FRACTION = 0.5 / 10
# Unit direction (dx, dy) in image coordinates (y grows downwards).
MOTION_DIRECTION: dict[str, tuple[int, int]] = {
    "moves left": (-1, 0),
    "moves right": (1, 0),
    "moves up": (0, -1),
    "moves down": (0, 1),
    "stays still": (0, 0),
}
# Keeps the anti-aliased fringe (which reaches past a triangle's sharp apex)
# off the border, so an object is never clipped.
_MARGIN_PX = 0.5
_MIN_RESOLUTION = 8
# Separate RNG streams, so a video and an image source with the same seed do
# not draw the same objects.
_VIDEO_STREAM = 0
_IMAGE_STREAM = 1
_STORY_STREAM = 2


@dataclasses.dataclass(frozen=True)
class ShapesSpec:
  """Everything needed to render one example.

  Attributes:
    shape: One of SHAPES.
    colour: A key of COLOURS.
    size: One of SIZES.
    motion: One of MOTIONS ("stays still" for images).
    start: (x, y) centre of the object's bounding box in the first frame, in
      units of the frame side (0 = left/top edge, 1 = right/bottom edge), so
      one spec renders the same scene at any resolution.
  """
  shape: str
  colour: str
  size: str
  motion: str
  start: tuple[float, float]

  def __post_init__(self):
    _check_choice("shape", self.shape, SHAPES)
    _check_choice("colour", self.colour, tuple(COLOURS))
    _check_choice("size", self.size, SIZES)
    _check_choice("motion", self.motion, MOTIONS)

  @property
  def rgb(self) -> tuple[int, int, int]:
    return COLOURS[self.colour]


def _check_choice(field: str, value: str, choices: Sequence[str]) -> None:
  if value not in choices:
    raise ValueError(f"Unknown {field} {value!r}; expected one of {choices}.")


def _check_resolution(resolution: int) -> int:
  resolution = int(resolution)
  if resolution < _MIN_RESOLUTION:
    raise ValueError(
        f"resolution must be >= {_MIN_RESOLUTION}, got {resolution}.")
  return resolution


def object_radius(size: str, resolution: int) -> float:
  """Half the object's diameter, in pixels."""
  return 0.5 * SIZE_FRACTION[size] * resolution


def speed(resolution: int) -> float:
  """Pixels per frame of a moving object."""
  return SPEED_FRACTION * resolution


def _centre_bounds(size: str, resolution: int) -> tuple[float, float]:
  """Range of centre coordinates (pixels) that keeps the object in frame."""
  r = object_radius(size, resolution) + _MARGIN_PX
  return r, resolution - r


def _segment_starts(lengths: Sequence[int]) -> list[int]:
  return [int(s) for s in np.cumsum([0, *lengths[:-1]])]


def _step_velocities(motions: Sequence[str], lengths: Sequence[int],
                     resolution: int) -> np.ndarray:
  """[T, 2] velocity taken to reach each frame (row 0 unused).

  The step into a segment's first frame already uses that segment's motion, so
  the change of direction shows right at the boundary.
  """
  v = speed(resolution)
  rows = [np.tile(np.asarray(MOTION_DIRECTION[m], np.float64) * v, (n, 1))
          for m, n in zip(motions, lengths)]
  return np.concatenate(rows, axis=0)


def _sample_start(rng: np.random.Generator, motions: Sequence[str],
                  lengths: Sequence[int], size: str,
                  resolution: int) -> tuple[float, float]:
  """Draws a start (pixels) that keeps leading segments border-free to mid.

  The object must not touch a border up to the middle frame of as many leading
  segments as possible (all of them if feasible, at least the first one where
  the clip allows); within that region the start is uniform.
  """
  lo, hi = _centre_bounds(size, resolution)
  vel = _step_velocities(motions, lengths, resolution)
  # Unbounced displacement from frame 0; valid while no bounce has happened.
  disp = np.cumsum(np.concatenate([np.zeros((1, 2)), vel[1:]]), axis=0)
  starts = _segment_starts(lengths)
  best = None
  for k in range(len(lengths)):
    mid = starts[k] + math.ceil((lengths[k] - 1) / 2)
    seen = disp[:mid + 1]
    low = lo - seen.min(axis=0)
    high = hi - seen.max(axis=0)
    if np.any(low > high):
      break
    best = (low, high)
  if best is None:
    # The first half of the clip is longer than the frame allows: start against
    # the trailing border so the caption's direction holds as long as possible.
    d = np.sign(vel[1] if len(vel) > 1 else np.zeros(2))
    low = np.where(d > 0, lo, np.where(d < 0, hi, lo))
    high = np.where(d == 0, hi, low)
    best = (low, high)
  low, high = best
  x, y = rng.uniform(low, high)
  return float(x), float(y)


def sample_spec(rng: np.random.Generator, resolution: int, num_frames: int,
                still_image: bool = False) -> ShapesSpec:
  """Draws shape, colour, size and motion uniformly, then a valid start."""
  resolution = _check_resolution(resolution)
  shape = SHAPES[rng.integers(len(SHAPES))]
  colour = tuple(COLOURS)[rng.integers(len(COLOURS))]
  size = SIZES[rng.integers(len(SIZES))]
  if still_image:
    motion, num_frames = STILL, 1
  else:
    motion = MOTIONS[rng.integers(len(MOTIONS))]
  x, y = _sample_start(rng, [motion], [max(int(num_frames), 1)], size,
                       resolution)
  return ShapesSpec(shape=shape, colour=colour, size=size, motion=motion,
                    start=(x / resolution, y / resolution))


def _bounce_path(start_px: tuple[float, float], vel: np.ndarray,
                 segment_starts: Sequence[int], lo: float,
                 hi: float) -> np.ndarray:
  """[T, 2] centres following `vel`, reflecting off [lo, hi] on each axis."""
  num_frames = vel.shape[0]
  pos = np.clip(np.asarray(start_px, np.float64), lo, hi)
  # Sign flips from bounces so far. A new segment resets them (even with the
  # same motion), because its caption names the on-screen direction from then.
  flip = np.ones(2)
  resets = set(segment_starts)
  out = np.empty((num_frames, 2))
  out[0] = pos
  for t in range(1, num_frames):
    if t in resets:
      flip = np.ones(2)
    p = pos + flip * vel[t]
    # One reflection per step suffices: a step is far shorter than hi - lo.
    over, under = p > hi, p < lo
    p = np.where(over, 2 * hi - p, np.where(under, 2 * lo - p, p))
    flip = np.where(over | under, -flip, flip)
    out[t] = pos = p
  return out


def trajectory(spec: ShapesSpec, num_frames: int,
               resolution: int) -> np.ndarray:
  """Centre of the object's bounding box per frame, [T, 2] (x, y) pixels."""
  resolution = _check_resolution(resolution)
  lo, hi = _centre_bounds(spec.size, resolution)
  vel = _step_velocities([spec.motion], [num_frames], resolution)
  start = (spec.start[0] * resolution, spec.start[1] * resolution)
  return _bounce_path(start, vel, [0], lo, hi)


def _coverage(shape: str, centres: np.ndarray, radius: float,
              resolution: int) -> np.ndarray:
  """[T, H, W] fraction of each pixel covered by the object, in [0, 1]."""
  grid = np.arange(resolution, dtype=np.float32) + 0.5  # Pixel centres.
  dx = grid[None, None, :] - centres[:, 0, None, None].astype(np.float32)
  dy = grid[None, :, None] - centres[:, 1, None, None].astype(np.float32)
  r = np.float32(radius)
  # Signed distance to the outline (negative inside); a unit-wide ramp across
  # the outline approximates area coverage.
  if shape == "circle":
    sdf = np.sqrt(dx * dx + dy * dy) - r
  elif shape == "square":
    sdf = np.maximum(np.abs(dx), np.abs(dy)) - r
  elif shape == "triangle":
    # Apex up at (0, -r), base corners at (+-r, r): base and height 2r.
    inv = np.float32(1 / math.sqrt(5))
    base = dy - r
    left = (-2 * dx - dy - r) * inv
    right = (2 * dx - dy - r) * inv
    sdf = np.maximum(base, np.maximum(left, right))
  else:
    raise ValueError(f"Unknown shape {shape!r}.")
  return np.clip(np.float32(0.5) - sdf, 0, 1)


def _paint(shape: str, colour: str, size: str, centres: np.ndarray,
           resolution: int) -> np.ndarray:
  alpha = _coverage(shape, centres, object_radius(size, resolution), resolution)
  rgb = np.asarray(COLOURS[colour], np.float32)
  # Colour channels are 0 or 255, so full coverage rounds to the exact colour.
  return np.rint(alpha[..., None] * rgb).astype(np.uint8)


def render_clip(spec: ShapesSpec, num_frames: int,
                resolution: int) -> np.ndarray:
  """Renders `spec` as uint8 [num_frames, resolution, resolution, 3]."""
  if num_frames < 1:
    raise ValueError(f"num_frames must be >= 1, got {num_frames}.")
  centres = trajectory(spec, num_frames, resolution)
  return _paint(spec.shape, spec.colour, spec.size, centres, resolution)


def caption_for(spec: ShapesSpec, still_image: bool = False) -> str:
  """"a {size} {colour} {shape}[ {motion}]"; images omit the motion."""
  words = f"a {spec.size} {spec.colour} {spec.shape}"
  return words if still_image else f"{words} {spec.motion}"


def _story_caption(colour: str, shape: str, motion: str) -> str:
  return f"the {colour} {shape} {motion}"


def _alternatives(words: Sequence[str]) -> str:
  return "|".join(re.escape(w) for w in words)


_CAPTION_RE = re.compile(
    rf"^(?:a (?P<size>{_alternatives(SIZES)})|the) "
    rf"(?P<colour>{_alternatives(COLOURS)}) "
    rf"(?P<shape>{_alternatives(SHAPES)})"
    rf"(?: (?P<motion>{_alternatives(MOTIONS)}))?$")


def parse_caption(caption: str) -> dict[str, str | None]:
  """Inverts captions from this module.

  Accepts "a {size} {colour} {shape}[ {motion}]" and the story continuation
  "the {colour} {shape} {motion}" (size None).

  Returns:
    {"size", "colour", "shape", "motion"}; absent parts are None.

  Raises:
    ValueError: `caption` is not in this grammar.
  """
  m = _CAPTION_RE.match(caption.strip())
  if m is None:
    raise ValueError(f"Not a shapes caption: {caption!r}")
  return {k: m.group(k) for k in ("size", "colour", "shape", "motion")}


def render_story(
    motions: Sequence[str],
    frames_per_segment: Sequence[int] | int,
    resolution: int,
    seed: int = 0,
    shape: str | None = None,
    colour: str | None = None,
    size: str | None = None,
) -> tuple[np.ndarray, list[str], list[int]]:
  """Renders one object whose motion changes between segments.

  Args:
    motions: One of MOTIONS per segment.
    frames_per_segment: Frames in each segment (or one count for all).
    resolution: Frame side in pixels.
    seed: Draws whatever of shape/colour/size is None, and the start.
    shape: Fixed shape, or None to draw one.
    colour: Fixed colour, or None to draw one.
    size: Fixed size, or None to draw one.

  Returns:
    frames: uint8 [T, resolution, resolution, 3], T = sum of segment lengths.
    captions: "a {size} {colour} {shape} {motion}" for the first segment,
      "the {colour} {shape} {motion}" for later ones.
    segment_starts: Index of each segment's first frame.
  """
  resolution = _check_resolution(resolution)
  motions = list(motions)
  if not motions:
    raise ValueError("A story needs at least one motion.")
  for m in motions:
    _check_choice("motion", m, MOTIONS)
  if isinstance(frames_per_segment, (int, np.integer)):
    lengths = [int(frames_per_segment)] * len(motions)
  else:
    lengths = [int(n) for n in frames_per_segment]
  if len(lengths) != len(motions):
    raise ValueError(
        f"{len(motions)} motions but {len(lengths)} segment lengths.")
  if any(n < 1 for n in lengths):
    raise ValueError(f"Segment lengths must be >= 1, got {lengths}.")

  rng = np.random.default_rng(seed)
  shape = shape if shape is not None else SHAPES[rng.integers(len(SHAPES))]
  colour = (colour if colour is not None
            else tuple(COLOURS)[rng.integers(len(COLOURS))])
  size = size if size is not None else SIZES[rng.integers(len(SIZES))]
  _check_choice("shape", shape, SHAPES)
  _check_choice("colour", colour, tuple(COLOURS))
  _check_choice("size", size, SIZES)

  start = _sample_start(rng, motions, lengths, size, resolution)
  lo, hi = _centre_bounds(size, resolution)
  starts = _segment_starts(lengths)
  centres = _bounce_path(start, _step_velocities(motions, lengths, resolution),
                         starts, lo, hi)
  frames = _paint(shape, colour, size, centres, resolution)
  first = ShapesSpec(shape=shape, colour=colour, size=size, motion=motions[0],
                     start=(start[0] / resolution, start[1] / resolution))
  captions = [caption_for(first)]
  captions += [_story_caption(colour, shape, m) for m in motions[1:]]
  return frames, captions, starts


def _item_rng(seed: int, stream: int, index: int) -> np.random.Generator:
  # A fresh generator per item keeps records independent of access order and
  # of which worker reads them.
  return np.random.default_rng([seed, stream, index])


def _check_index(index: Any, length: int) -> int:
  index = int(index)
  if index < 0:
    index += length
  if not 0 <= index < length:
    raise IndexError(f"Index out of range for {length} records.")
  return index


class ShapesVideoSource:
  """Random-access grain source of {"frames": [T, H, W, 3] uint8, "caption"}."""

  def __init__(self, num_frames: int, resolution: int, seed: int = 0,
               num_records: int = 1_000_000):
    if num_frames < 1:
      raise ValueError(f"num_frames must be >= 1, got {num_frames}.")
    if seed < 0 or num_records < 1:
      raise ValueError("seed must be >= 0 and num_records >= 1.")
    self.num_frames = int(num_frames)
    self.resolution = _check_resolution(resolution)
    self.seed = int(seed)
    self.num_records = int(num_records)

  def __len__(self) -> int:
    return self.num_records

  def spec(self, index: int) -> ShapesSpec:
    """The spec behind record `index`."""
    index = _check_index(index, self.num_records)
    rng = _item_rng(self.seed, _VIDEO_STREAM, index)
    return sample_spec(rng, self.resolution, self.num_frames, still_image=False)

  def __getitem__(self, index: int) -> dict[str, Any]:
    spec = self.spec(index)
    return {"frames": render_clip(spec, self.num_frames, self.resolution),
            "caption": caption_for(spec, still_image=False)}

  def __repr__(self) -> str:
    return (f"ShapesVideoSource(num_frames={self.num_frames}, "
            f"resolution={self.resolution}, seed={self.seed}, "
            f"num_records={self.num_records})")


class ShapesImageSource:
  """Random-access grain source of {"frames": [1, H, W, 3] uint8, "caption"}."""

  def __init__(self, resolution: int, seed: int = 0,
               num_records: int = 1_000_000):
    if seed < 0 or num_records < 1:
      raise ValueError("seed must be >= 0 and num_records >= 1.")
    self.resolution = _check_resolution(resolution)
    self.seed = int(seed)
    self.num_records = int(num_records)

  def __len__(self) -> int:
    return self.num_records

  def spec(self, index: int) -> ShapesSpec:
    """The spec behind record `index`."""
    index = _check_index(index, self.num_records)
    rng = _item_rng(self.seed, _IMAGE_STREAM, index)
    return sample_spec(rng, self.resolution, 1, still_image=True)

  def __getitem__(self, index: int) -> dict[str, Any]:
    spec = self.spec(index)
    return {"frames": render_clip(spec, 1, self.resolution),
            "caption": caption_for(spec, still_image=True)}

  def __repr__(self) -> str:
    return (f"ShapesImageSource(resolution={self.resolution}, "
            f"seed={self.seed}, num_records={self.num_records})")


class ShapesStorySource:
  """Random-access source of two-segment story clips, for the generator's story task.

  Record i is one object that moves one way for the first K frames (the
  context a story carries over) and another way after:
  {"frames": uint8 [T, H, W, 3], "caption": the second segment's story
  caption ("the red circle moves up"), "prefix_frames": K}. K is drawn from
  `context_frames` (each 1 + m·temporal patch, so it tokenises to whole token
  frames); the generator gets the context's tokens unmasked and learns the
  rest from the new caption, as it samples a story's later windows.

  With `memory_frames` > 0 (the generator's long-term memory) the record
  also holds "memory_frames": uint8 [memory_frames, H, W, 3] of the same
  object at its own random place and motion, never part of the clip: a
  story's opening as a later window sees it (same look, unrelated place, so
  the memory teaches appearance, not where the object is). The clip itself
  is the record's clip without memory, draw for draw.
  """

  def __init__(self, num_frames: int, resolution: int, context_frames: Sequence[int],
               seed: int = 0, num_records: int = 1_000_000, memory_frames: int = 0):
    context_frames = tuple(int(k) for k in context_frames)
    if not context_frames or any(not 1 <= k < num_frames for k in context_frames):
      raise ValueError(f"context_frames {context_frames} must be in [1, {num_frames})")
    self.num_frames = int(num_frames)
    self.resolution = _check_resolution(resolution)
    self.context_frames = context_frames
    self.seed = int(seed)
    self.num_records = int(num_records)
    self.memory_frames = int(memory_frames)
    if self.memory_frames < 0:
      raise ValueError(f"memory_frames={memory_frames} must be >= 0")

  def __len__(self) -> int:
    return self.num_records

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = _check_index(index, self.num_records)
    rng = _item_rng(self.seed, _STORY_STREAM, index)
    k = self.context_frames[rng.integers(len(self.context_frames))]
    first = MOTIONS[rng.integers(len(MOTIONS))]
    second = [m for m in MOTIONS if m != first][rng.integers(len(MOTIONS) - 1)]
    frames, captions, _ = render_story([first, second], [k, self.num_frames - k],
                                       self.resolution, seed=int(rng.integers(2 ** 31)))
    record = {"frames": frames, "caption": captions[1], "prefix_frames": np.int32(k)}
    if self.memory_frames:
      look = parse_caption(captions[0])
      memory, _, _ = render_story([MOTIONS[rng.integers(len(MOTIONS))]], [self.memory_frames],
                                  self.resolution, seed=int(rng.integers(2 ** 31)),
                                  shape=look["shape"], colour=look["colour"], size=look["size"])
      record["memory_frames"] = memory
    return record

  def __repr__(self) -> str:
    return (f"ShapesStorySource(num_frames={self.num_frames}, resolution={self.resolution}, "
            f"context_frames={self.context_frames}, seed={self.seed}, "
            f"memory_frames={self.memory_frames})")
