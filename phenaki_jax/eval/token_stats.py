"""How learnable a tokenizer's codes are, on the built-in shapes (black background).

Reconstruction metrics say how well a tokenizer draws; they do not say how
hard its codes are to predict, which is what the generator has to do. On the
built-in clips the background is pure black, so any spread of the codes that
black tubelets get is noise the generator must model and cannot learn from
(dead-code restarts, for one, copy background vectors into many near-equal
codes). These statistics split the tokens of clips into background (every
pixel of the token's tubelet black) and object, and give for each the number
of distinct codes and their entropy; for the background also the entropy at a
fixed token position, which a generator cannot reduce by looking at where it is.
"""
from __future__ import annotations

import numpy as np

# A tubelet whose every channel of every pixel is below this counts as black
# (the renderer's background is exactly 0; the margin covers video codecs).
_BLACK_LEVEL = 8


def object_token_mask(clips: np.ndarray, patch_size: int, temporal_patch_size: int
                      ) -> np.ndarray:
  """bool (N, 1 + k, h, w): True where the token's pixels are not all black.

  clips: uint8 (N, T, H, W, 3) with T = 1 + k·temporal_patch_size; token frame
  0 is frame 0 alone and token frame i ≥ 1 the frames 1 + (i−1)·t_p … i·t_p,
  as C-ViViT tokenizes them.
  """
  clips = np.asarray(clips)
  n, t, height, width, _ = clips.shape
  if (t - 1) % temporal_patch_size or height % patch_size or width % patch_size:
    raise ValueError(f"clips {clips.shape[1:4]} do not tile into 1 + k·{temporal_patch_size} "
                     f"frames of {patch_size}×{patch_size} patches")
  h, w = height // patch_size, width // patch_size
  brightest = clips.reshape(n, t, h, patch_size, w, patch_size, 3).max(axis=(3, 5, 6))
  first = brightest[:, :1]
  rest = brightest[:, 1:].reshape(n, -1, temporal_patch_size, h, w).max(axis=2)
  return np.concatenate([first, rest], axis=1) >= _BLACK_LEVEL


def _entropy(values: np.ndarray) -> float:
  if values.size == 0:
    return 0.0
  _, counts = np.unique(values, return_counts=True)
  p = counts / counts.sum()
  return float(-(p * np.log(p)).sum())


def code_statistics(codes: np.ndarray, is_object: np.ndarray) -> dict[str, float]:
  """Distinct codes and entropies (nats) of background and object tokens.

  codes: int (N, T, h, w); is_object: bool of the same shape (object_token_mask).
  """
  codes, is_object = np.asarray(codes), np.asarray(is_object, bool)
  if codes.shape != is_object.shape:
    raise ValueError(f"codes {codes.shape} and object mask {is_object.shape} differ in shape")
  background = ~is_object
  # Entropy at a fixed (token frame, row, column), weighted by how many
  # background tokens each position has.
  per_position, weights = [], []
  for index in np.ndindex(*codes.shape[1:]):
    sel = background[(slice(None), *index)]
    if sel.any():
      per_position.append(_entropy(codes[(slice(None), *index)][sel]))
      weights.append(sel.sum())
  return {
      "background_fraction": float(background.mean()),
      "background_codes": int(np.unique(codes[background]).size),
      "background_entropy": _entropy(codes[background]),
      "background_entropy_given_position": (
          float(np.average(per_position, weights=weights)) if weights else 0.0),
      "object_codes": int(np.unique(codes[is_object]).size),
      "object_entropy": _entropy(codes[is_object]),
  }
