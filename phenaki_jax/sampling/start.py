"""What a video starts from: an image (image-to-video) or the last frames of a video file.

  start = load_start("cat.png", generator, context_frames=5, fps=8)       # 1 frame
  start = load_start("clip.mp4", generator, context_frames=5, fps=8)      # its last 5
  videos = generator.continue_from(prompts, start.frames, seed=0)

Frames are read as training data is prepared (phenaki_jax/data/video_io.py:
upright RGB, resized to cover the tokenizer's resolution, centre-cropped; a
video resampled by timestamp to `fps`, the rate the generator's frames are
shown at). A video gives its last K frames, K = `context_frames`, or the
longest start length the generator takes that the video holds; an image is
one frame, encoded through the tokenizer's first-frame path. Unreadable
files and videos too short for any start are refused naming the file.
"""
from __future__ import annotations

import dataclasses

import numpy as np
from absl import logging

from phenaki_jax.data import video_io
from phenaki_jax.generator import Generator


@dataclasses.dataclass(frozen=True)
class Start:
  """uint8 frames (K, H, W, 3) to continue from, and where they came from."""
  frames: np.ndarray
  path: str
  kind: str  # 'image' or 'video'

  def describe(self) -> dict:
    return {"path": self.path, "kind": self.kind, "frames": int(self.frames.shape[0])}


def load_start(path: str, gen: Generator, *, context_frames: int, fps: float,
               key: str = "config.start") -> Start:
  """The start `path` names, sized for `gen` (see the module docstring)."""
  resolution = int(gen.tokenizer.config.input.resolution)
  lengths = gen.start_lengths()
  if not lengths:
    raise ValueError(f"{key}={path!r}: this generator's window ({gen.num_frames} frames) has "
                     "no room for a start")
  try:
    if video_io.is_image_path(path):
      return Start(video_io.read_image(path, resolution=resolution), path, "image")
    frames = video_io.read_video(path, fps=fps, resolution=resolution)
  except video_io.VideoDecodeError as e:
    raise ValueError(f"{key}={path!r}: cannot be read as a start ({e})") from e
  wanted = context_frames if context_frames > 0 else lengths[-1]
  fits = [k for k in lengths if k <= min(wanted, len(frames))]
  if not fits:
    raise ValueError(f"{key}={path!r}: {len(frames)} frames at {fps:g} fps; a start needs one "
                     f"of {lengths} frames")
  if fits[-1] < wanted:
    logging.warning("%s=%r: %d frames at %g fps, fewer than the %d asked for; starting from "
                    "the last %d", key, path, len(frames), fps, wanted, fits[-1])
  return Start(np.ascontiguousarray(frames[-fits[-1]:]), path, "video")
