"""Stories: one continuous video from a sequence of prompts (Phenaki's headline ability).

A storyboard is a list of segments, each a prompt with defaults for the rest:

  # story.yaml (or the same as JSON)
  defaults: {context_frames: 5, guidance_scale: 3.0}
  segments:
    - prompt: a large red circle moves right
      num_frames: 11          # new frames of this segment (or seconds: 1.5)
    - prompt: the red circle moves up
    - {prompt: the red circle moves left, seed: 7, guidance_scale: 5.0}

The generator makes clips of its trained length T (1 + k·t_p frames, t token
frames). The first window is sampled from scratch. Every later window keeps
the last K = context_frames frames of the video so far: they are re-encoded by
the causal tokenizer, their 1 + (K−1)/t_p token frames are frozen as the
window's prefix, the window's prompt is the segment's, the remaining token
frames are generated, and the T − K new frames are appended. A segment runs
as many windows as its frame count needs. Only one window lives on the
device, and frames stream to the output file, so memory does not grow with
the length of the story.

Two experimental switches (off by default; measured in benchmarks/RESULTS.md,
"Long-term memory and seam blending"), each a SamplingOptions field, a
storyboard default and a segment key:
  * memory_guidance_scale > 0, for a generator trained with long-term memory
    (model.memory_token_frames = m): the first m token frames of the story's
    first window are the memory of every later window (cross-attention,
    guided on their own: Generator.sample_tokens), against object drift.
  * seam_blending: each decoding step keeps the prefix token frames before a
    random split and re-samples the ones after it (parallel_decode.decode),
    so a window does not join its context at one hard copy boundary. The
    context frames already written stay as they are; the new frames are
    decoded from the blended tokens (measured: seams got worse).
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable, Sequence

import numpy as np

from phenaki_jax import storage
from phenaki_jax.generator import Generator, SamplingOptions
from phenaki_jax.models import cvivit

_SEGMENT_KEYS = ("prompt", "num_frames", "seconds", "context_frames", "guidance_scale", "seed",
                 "memory_guidance_scale", "seam_blending")


@dataclasses.dataclass(frozen=True)
class Segment:
  """One prompt of a story.

  Attributes:
    prompt: the text for this segment's windows.
    num_frames: new frames this segment adds; 0 takes `seconds`, else one window's worth.
    seconds: new frames as a duration at the story's frame rate (when num_frames is 0).
    context_frames: K frames of the video so far kept as the frozen prefix of
      each window (1 + m·t_p, fewer than the window); -1: the story default
      (which defaults to the longest allowed K of about half the window: 5 of
      the default generator's 11 frames); 0: a hard cut (no context).
    guidance_scale: None: the story default.
    seed: None: story seed + segment index.
    memory_guidance_scale: None: the story default (experimental; see above).
    seam_blending: None: the story default (experimental; see above).
  """
  prompt: str
  num_frames: int = 0
  seconds: float = 0.0
  context_frames: int = -1
  guidance_scale: float | None = None
  seed: int | None = None
  memory_guidance_scale: float | None = None
  seam_blending: bool | None = None


def parse_segments(items: Sequence[Any], defaults: dict[str, Any] | None = None,
                   where: str = "storyboard") -> list[Segment]:
  """Segments from dicts (or bare prompt strings), with `defaults` under each."""
  defaults = dict(defaults or {})
  unknown = sorted(set(defaults) - set(_SEGMENT_KEYS) - {"prompt"})
  if unknown:
    raise ValueError(f"{where}: unknown default key(s) {unknown}; known: {_SEGMENT_KEYS[1:]}")
  segments = []
  for i, item in enumerate(items):
    entry = {"prompt": item} if isinstance(item, str) else dict(item)
    bad = sorted(set(entry) - set(_SEGMENT_KEYS))
    if bad:
      raise ValueError(f"{where}: segment {i} has unknown key(s) {bad}; known: {_SEGMENT_KEYS}")
    if not str(entry.get("prompt", "")).strip():
      raise ValueError(f"{where}: segment {i} has no prompt")
    segments.append(Segment(**{**defaults, **entry}))
  if not segments:
    raise ValueError(f"{where}: no segments")
  return segments


def load_storyboard(path: str) -> list[Segment]:
  """A YAML or JSON file (local or gs://): a list of segments, or
  {'defaults': {...}, 'segments': [...], 'start': FILE}."""
  return read_storyboard(path)[0]


def read_storyboard(path: str) -> tuple[list[Segment], str]:
  """(segments, start) of a storyboard file; start: the image or video the story goes
  on from (a path relative to the storyboard's folder, or absolute, or gs://), or ''."""
  try:
    text = storage.read_text(path)  # local or gs://
  except storage.StorageNotFoundError:
    raise FileNotFoundError(f"storyboard {path}: no such file") from None
  except (storage.StorageError, UnicodeDecodeError) as e:
    raise ValueError(f"storyboard {path}: cannot read it ({e})") from None
  try:
    if path.endswith(".json"):
      data = json.loads(text)
    else:
      import yaml  # pylint: disable=g-import-not-at-top
      data = yaml.safe_load(text)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"storyboard {path}: cannot parse it ({type(e).__name__}: {e})") from None
  if isinstance(data, dict):
    extra = sorted(set(data) - {"defaults", "segments", "start"})
    if extra:
      raise ValueError(f"storyboard {path}: unknown top-level key(s) {extra}; "
                       "expected 'defaults', 'segments' and 'start'")
    start = str(data.get("start") or "")
    if start and not (start.startswith("/") or storage.is_remote(start)):
      start = storage.join(storage.dirname(path) or ".", start)
    return parse_segments(data.get("segments") or [], data.get("defaults"), where=path), start
  if isinstance(data, list):
    return parse_segments(data, where=path), ""
  raise ValueError(f"storyboard {path}: expected a list of segments or a mapping with 'segments'")


@dataclasses.dataclass
class StoryResult:
  """What a story run produced (the frames themselves went to the sink)."""
  num_frames: int
  segments: list[dict[str, Any]]
  strip_frames: list[tuple[str, np.ndarray]]  # (label, frames) a few per segment


class StoryWindow:
  """The geometry of a generator's window: trained frames, token frames, t_p."""

  def __init__(self, gen: Generator):
    self.token_frames = gen.token_grid[0]
    self.temporal_patch = int(gen.tokenizer.config.model.temporal_patch_size)
    self.frames = cvivit.num_frames_of(self.token_frames, self.temporal_patch)

  def allowed_contexts(self) -> list[int]:
    """K-frame contexts that tokenise to whole token frames, shorter than the window."""
    return [cvivit.num_frames_of(m, self.temporal_patch) for m in range(1, self.token_frames)]

  def default_context(self) -> int:
    """The longest allowed context of at most about half the window."""
    fits = [k for k in self.allowed_contexts() if k <= (self.frames + 1) // 2]
    return fits[-1] if fits else 0

  def fitting_context(self, k: int, available: int) -> int:
    """The context a window takes: K frames, or the longest allowed one of the `available`
    frames written since the story's start or its last cut (0: none)."""
    fits = [c for c in self.allowed_contexts() if c <= min(k, available)]
    return fits[-1] if fits else 0

  def check_context(self, k: int, where: str) -> int:
    """Token frames of a K-frame context; errors say which K are possible."""
    if k == 0:
      return 0
    allowed = self.allowed_contexts()
    if k not in allowed:
      raise ValueError(f"{where}: context_frames={k}; this generator's window is {self.frames} "
                       f"frames (temporal patch {self.temporal_patch}), so the context must be "
                       f"one of {allowed} (or 0 for a cut)")
    return cvivit.num_token_frames(k, self.temporal_patch)


def generate_story(gen: Generator, segments: Sequence[Segment], *, sink: Callable[[np.ndarray],
                                                                                   None],
                   options: SamplingOptions = SamplingOptions(), seed: int = 0,
                   context_frames: int = -1, fps: float = 8.0,
                   strip_frames_per_segment: int = 3,
                   on_segment: Callable[[int, np.ndarray], None] | None = None,
                   start: np.ndarray | None = None,
                   start_in_output: bool = True) -> StoryResult:
  """Generates the story window by window.

  Every new frame goes to `sink` as uint8 (n, H, W, 3) as soon as it is
  decoded; `on_segment(i, frames)`, when given, gets each finished segment's
  frames (one segment is held on the host for it, e.g. to score it).
  `start` (uint8 (K, H, W, 3), phenaki_jax/sampling/start.py): frames the
  story goes on from, as if written before its first segment (its context;
  with start_in_output they open the video, the segments' frames after).
  """
  window = StoryWindow(gen)
  if context_frames < 0:
    context_frames = window.default_context()
  plan = []
  for i, seg in enumerate(segments):
    where = f"segment {i} ({seg.prompt!r})"
    k = context_frames if seg.context_frames < 0 else seg.context_frames
    window.check_context(k, where)
    n = seg.num_frames or (int(round(seg.seconds * fps)) if seg.seconds else 0)
    if n < 0:
      raise ValueError(f"{where}: num_frames={seg.num_frames} must be >= 0")
    if n == 0:  # one window's worth
      n = window.frames if ((i == 0 and start is None) or k == 0) else window.frames - k
    seg_options = _segment_options(options, seg)
    seg_options.check()
    if seg_options.memory_guidance_scale > 0 and not gen.memory_token_frames:
      raise ValueError(f"{where}: memory_guidance_scale={seg_options.memory_guidance_scale}, "
                       "but this generator has no long-term memory (it trained with "
                       "model.memory_token_frames=0); set it to 0")
    plan.append((seg, k, n, seg_options))

  history = None  # the last frames written (at most the largest K), host uint8
  keep = max(max((k for _, k, _, _ in plan), default=1), 1)
  memory = None  # the first token frames of the story's first window, when it has memory
  total, records, strips = 0, [], []
  if start is not None:
    history = np.asarray(start, np.uint8)[-keep:]
    if start_in_output:
      sink(np.asarray(start, np.uint8))
      total = len(start)
  for i, (seg, k, n, seg_options) in enumerate(plan):
    seg_seed = seed + i if seg.seed is None else seg.seed
    start, made, w = total, 0, 0
    segment_frames, window_starts = [], []
    picks = set(np.linspace(0, n - 1, min(n, strip_frames_per_segment)).round().astype(int))
    if k == 0 and (i > 0 or start is not None):
      history = None  # a hard cut: nothing before it is context for what follows
    contexts = []
    while made < n:
      # The context is K frames, or the longest allowed one the video since the
      # story's start or its last cut holds (a short segment before this one).
      used = window.fitting_context(k, 0 if history is None else len(history))
      use_context = used > 0
      prefix = None
      if use_context:
        prefix = np.asarray(gen.tokenizer.encode(history[None, -used:]))
      # Window 0 of a segment samples with the segment's seed itself, so a
      # one-segment story is exactly gen.generate([prompt], seed=seed).
      tokens = gen.sample_tokens([seg.prompt], seed=seg_seed + 1_000_003 * w,
                                 options=seg_options, prefix_tokens=prefix,
                                 memory_tokens=(memory if seg_options.memory_guidance_scale > 0
                                                else None))
      if memory is None and gen.memory_token_frames:
        memory = tokens[:, :gen.memory_token_frames]
      frames = gen.decode(tokens)[0]
      new = frames[used:]
      contexts.append(used)
      new = new[:n - made]
      window_starts.append(total)
      sink(new)
      if on_segment is not None:
        segment_frames.append(new)
      for j in range(len(new)):
        if made + j in picks:
          strips.append((f"{i}: {seg.prompt}", new[j]))
      history = new[-keep:] if history is None else np.concatenate([history, new])[-keep:]
      made += len(new)
      total += len(new)
      w += 1
    if on_segment is not None:
      on_segment(i, np.concatenate(segment_frames))
    records.append({"index": i, "prompt": seg.prompt, "start_frame": start, "end_frame": total,
                    "num_frames": n, "windows": w, "window_starts": window_starts,
                    "context_frames": k if i or start is not None else 0,
                    "window_contexts": contexts,
                    "guidance_scale": seg_options.guidance_scale, "seed": seg_seed,
                    "memory_guidance_scale": seg_options.memory_guidance_scale,
                    "seam_blending": seg_options.seam_blending,
                    "start_seconds": round(start / fps, 3)})
  return StoryResult(num_frames=total, segments=records, strip_frames=strips)


def _segment_options(options: SamplingOptions, seg: Segment) -> SamplingOptions:
  """The story's options with what the segment sets itself."""
  own = {key: getattr(seg, key) for key in ("guidance_scale", "memory_guidance_scale",
                                            "seam_blending") if getattr(seg, key) is not None}
  return dataclasses.replace(options, **own)

