"""Going on from given frames for longer than one generator window.

  video = continue_video(gen, prompts, start, total_frames=16, seed=0)

The first window continues from the start's K frames (Generator.continue_from);
each later one from the last frames made so far, as a story's windows go on
from the one before (sampling/story.py StoryWindow: K frames that tokenise
to whole token frames). One window's worth needs no later ones.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from phenaki_jax.generator import Generator, SamplingOptions
from phenaki_jax.sampling.story import StoryWindow


def window_plan(gen: Generator, start_frames: int, total_frames: int,
                context_frames: int = -1) -> list[tuple[int, int]]:
  """(context frames, new frames kept) of each window that takes `start_frames` to
  `total_frames`; `context_frames` for the windows after the first (-1: about half
  a window, StoryWindow.default_context)."""
  window = StoryWindow(gen)
  if start_frames not in gen.start_lengths():
    raise ValueError(f"a start of {start_frames} frames: this generator continues from one of "
                     f"{gen.start_lengths()} frames")
  later = window.default_context() if context_frames < 0 else context_frames
  if later not in window.allowed_contexts():
    raise ValueError(f"context_frames={later}: this generator's window is {window.frames} "
                     f"frames, so a context must be one of {window.allowed_contexts()}")
  plan, have = [], start_frames
  while have < total_frames:
    k = start_frames if not plan else window.fitting_context(later, have)
    new = min(window.frames - k, total_frames - have)
    plan.append((k, new))
    have += new
  return plan


def continue_video(gen: Generator, prompts: Sequence[str], start: np.ndarray, total_frames: int,
                   *, seed: int = 0, options: SamplingOptions = SamplingOptions(),
                   context_frames: int = -1, seed_stride: int | None = None) -> np.ndarray:
  """uint8 (B, total_frames, H, W, 3): the start's frames as given, then new ones.

  `start`: uint8 (B, K, H, W, 3), one per prompt (or (K, H, W, 3) for all).
  Window w samples example i with seed + w·seed_stride + i (seed_stride:
  default the batch size), so no two windows or examples share a key.
  """
  frames = np.asarray(start)
  if frames.ndim == 4:
    frames = np.repeat(frames[None], len(prompts), axis=0)
  stride = len(prompts) if seed_stride is None else seed_stride
  video = frames
  for w, (k, new) in enumerate(window_plan(gen, frames.shape[1], total_frames, context_frames)):
    made = gen.continue_from(prompts, video[:, video.shape[1] - k:], seed=seed + w * stride,
                             options=options, include_start=False)
    video = np.concatenate([video, made[:, :new]], axis=1)
  return video
