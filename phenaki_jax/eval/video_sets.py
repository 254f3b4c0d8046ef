"""The two sets of clips the generated-video evaluation compares, and the protocol that cuts them.

A set iterates Items (a whole decoded or generated video, its caption, a
story's segments) and records what it skipped: a folder of mp4/GIF files
(FolderSet), a MaskGIT workdir sampled on prompts (CheckpointSet), prepared
shards or TFDS (RecordSet), or held-out built-in clips (ShapesSet).
open_generated / open_reference pick one from config.generated / reference;
folders and files may be local or gs:// (phenaki_jax/storage.py).
The Protocol (config.protocol) says how each video becomes clips.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Iterator

import ml_collections
import numpy as np
from absl import logging

from phenaki_jax import storage
from phenaki_jax.config.schema import ConfigError
from phenaki_jax.data import pipeline, shard_records, sources, synthetic, video_io
from phenaki_jax.eval import fvd as fvd_lib
from phenaki_jax.eval import shapes_score
from phenaki_jax.generator import Generator, SamplingOptions

VIDEO_EXTENSIONS = (".mp4", ".gif", ".webm", ".mov", ".avi", ".mkv")
RESIZE_POLICIES = ("bilinear_antialias", "bilinear")
REPEAT_MODES = ("disjoint", "bootstrap")


# --- The protocol.

@dataclasses.dataclass(frozen=True)
class Protocol:
  """config.protocol with num_frames and resolution resolved."""
  fvd: bool
  num_clips: int
  num_frames: int
  frame_stride: int
  fps: float
  clips_per_video: int
  resolution: int
  center_crop: bool
  resize: str
  fvd_resolution: int
  seed: int
  repeats: int
  repeat_mode: str
  batch_size: int

  @classmethod
  def from_config(cls, p: ml_collections.ConfigDict) -> "Protocol":
    return cls(**{f.name: p[f.name] for f in dataclasses.fields(cls)})

  @property
  def span(self) -> int:
    """Frames of the source one clip covers."""
    return (self.num_frames - 1) * self.frame_stride + 1

  @property
  def clips_wanted(self) -> int:
    """Clips taken from each set: disjoint repeats each take num_clips of their own."""
    return self.num_clips * (self.repeats if self.repeat_mode == "disjoint" else 1)


def describe_protocol(p: Protocol) -> dict[str, Any]:
  """What the resolved protocol means, in words, for the report."""
  return {
      "num_frames": p.num_frames, "resolution": p.resolution, "span_frames": p.span,
      "features": fvd_lib.FVD_FEATURES,
      "frames": (f"{p.num_frames} frames at stride {p.frame_stride} from each clip's start, "
                 f"{'resampled to ' + format(p.fps, 'g') + ' fps' if p.fps else 'as stored'}"),
      "clip_selection": (
          f"folders: files in an order shuffled with protocol.seed={p.seed}, up to "
          f"{p.clips_per_video} non-overlapping clip(s) from each file's start (every "
          "clip of a story); shards / TFDS: records in a seeded permutation; shapes: "
          "held-out clips of the eval seed stream; a MaskGIT workdir: samples in prompt "
          "order; each set stops at clips_wanted"),
      "host_resize": ((f"centre square crop, then bicubic (antialiased) to {p.resolution}²"
                       if p.center_crop else f"bilinear to {p.resolution}² (aspect not kept)")
                      + " on the host, for both sets"),
      "i3d_resize": (f"{'bilinear with antialiasing' if p.resize == 'bilinear_antialias' else 'bilinear without antialiasing (as the original TF FVD)'}"
                     f" to {p.fvd_resolution}x{p.fvd_resolution}, in the graph"),
      "repeats": (f"{p.repeats} FVD(s) over {'disjoint subsets of num_clips clips' if p.repeat_mode == 'disjoint' else 'bootstrap resamples (with replacement, seeded) of the num_clips clips'}"
                  if p.repeats > 1 else "one FVD over num_clips clips"),
      "clips_wanted": p.clips_wanted,
  }


def to_resolution(frames: np.ndarray, p: Protocol) -> np.ndarray:
  """uint8 (T, h, w, 3) -> (T, r, r, 3) by the protocol's host resize."""
  r = p.resolution
  if frames.shape[1:3] == (r, r):
    return np.ascontiguousarray(frames)
  if p.center_crop:
    return np.stack([video_io.resize_and_crop(f, (r, r)) for f in frames])
  return pipeline.resize_frames(np.ascontiguousarray(frames), r, r)


def cut_clips(video: np.ndarray, p: Protocol, max_clips: int) -> list[np.ndarray]:
  """Non-overlapping protocol clips from the video's start (max_clips 0: all)."""
  out = []
  for start in range(0, len(video) - p.span + 1, p.span):
    out.append(to_resolution(video[start:start + p.span:p.frame_stride], p))
    if max_clips and len(out) >= max_clips:
      break
  return out


# --- The sets.

@dataclasses.dataclass
class Item:
  """One video of a set: the whole video as decoded or generated."""
  name: str
  video: np.ndarray  # uint8 (T, H, W, 3)
  caption: str | None = None
  segments: list[dict[str, Any]] | None = None  # a story's segment records
  info: dict[str, Any] = dataclasses.field(default_factory=dict)


class VideoSet:
  """Iterates Items; records what it had to skip."""
  kind = ""

  def __init__(self):
    self.skipped: list[dict[str, str]] = []

  def skip(self, name: str, kind: str, reason: str) -> None:
    self.skipped.append({"file": name, "kind": kind, "reason": reason})
    logging.warning("skipped %s (%s): %s", name, kind, reason)

  def describe(self) -> dict[str, Any]:
    raise NotImplementedError

  def __iter__(self) -> Iterator[Item]:
    raise NotImplementedError


def _list_videos(folder: str, names: list[str]) -> list[str]:
  """The video files among a folder's names (hidden ones, e.g. a staged write's, left out)."""
  videos = [f for f in names if storage.splitext(f)[1].lower() in VIDEO_EXTENSIONS
            and not f.startswith(".")]
  if storage.is_remote(folder):
    return videos  # one request per object would be slow; a "folder" there is a prefix
  return [f for f in videos if storage.isfile(storage.join(folder, f))]


def _one_per_stem(files: list[str]) -> list[str]:
  """The sample job writes 0000.mp4 and 0000.gif: keep one per stem, mp4 first."""
  by_stem: dict[str, list[str]] = {}
  for f in files:
    by_stem.setdefault(storage.splitext(f)[0], []).append(f)
  rank = {ext: i for i, ext in enumerate(VIDEO_EXTENSIONS)}
  return [min(v, key=lambda f: rank[storage.splitext(f)[1].lower()]) for v in by_stem.values()]


def _read_json(path: str, key: str) -> Any:
  try:
    return storage.read_json(path)
  except (OSError, ValueError) as e:
    raise ConfigError(f"config.{key}: cannot read {path}: {e}") from None


def _read_text(path: str, key: str) -> str:
  try:
    return storage.read_text(path)
  except (OSError, ValueError) as e:
    raise ConfigError(f"config.{key}: cannot read {path}: {e}") from None


def read_captions(path: str, key: str = "captions") -> dict[str, str]:
  """{file name or stem: caption} from a JSON mapping or a JSONL manifest of {path, caption}."""
  if path.endswith(".jsonl"):
    out = {}
    for n, line in enumerate(_read_text(path, key).splitlines(), 1):
      if line.strip():
        try:
          entry = json.loads(line)
          out[storage.basename(entry["path"])] = str(entry["caption"])
        except (ValueError, KeyError, TypeError, AttributeError):
          raise ConfigError(f"config.{key}={path!r}: line {n} is not "
                            '{"path": ..., "caption": ...}') from None
    return out
  data = _read_json(path, key)
  if not isinstance(data, dict):
    raise ConfigError(f"config.{key}={path!r}: expected a JSON object {{file: caption}}")
  return {storage.basename(str(k)): str(v) for k, v in data.items()}


class FolderSet(VideoSet):
  """Videos in a folder: a sample job's output, stories, or any mp4/GIF files."""

  def __init__(self, folder: str, *, key: str, protocol_seed: int, fps: float,
               captions_path: str = "", with_captions: bool = True):
    super().__init__()
    self.folder, self.key, self.fps = folder, key, fps
    # (relative file, caption, story segments or None)
    entries: list[tuple[str, str | None, list | None]] = []
    self.caption_source = None
    try:
      names = storage.listdir(folder)  # one listing; the checks below look names up in it
    except storage.StorageError as e:
      raise ConfigError(f"config.{key}={folder!r}: {e}") from None
    present = set(names)
    stories = []  # (subfolder, or "" for the folder itself; its story.json)
    if with_captions:
      if "story.json" in present:
        stories.append(("", storage.join(folder, "story.json")))
      stories += [(storage.basename(storage.dirname(p)), p)
                  for p in storage.glob(folder, "*/story.json")]
    for sub, path in sorted(stories, key=lambda s: s[1]):  # by path, as listed
      record = _read_json(path, key)
      files = [f for f in record.get("files", ["story.mp4"]) if not f.endswith(".gif")]
      name = (files or ["story.mp4"])[0]
      rel = f"{sub}/{name}" if sub else name
      segments = [{**s, "window_frames": record.get("window_frames")}
                  for s in record.get("segments", [])]
      entries.append((rel, None, segments))
      self.caption_source = "story.json (segment prompts)"
    if with_captions and "samples.json" in present:
      samples_json = storage.join(folder, "samples.json")
      for record in _read_json(samples_json, key).get("samples", []):
        files = sorted(record.get("files", []), key=lambda f: not f.endswith(".mp4"))
        if files:
          entries.append((files[0], str(record.get("prompt", "")) or None, None))
      self.caption_source = "samples.json"
    if not entries:
      files = _one_per_stem(_list_videos(folder, names))
      captions: dict[str, str] = {}
      if with_captions and captions_path:
        captions, self.caption_source = read_captions(captions_path), captions_path
      elif with_captions and "captions.json" in present:
        captions = read_captions(storage.join(folder, "captions.json"), key)
        self.caption_source = "captions.json"
      for f in files:
        stem = storage.splitext(f)[0]
        caption = captions.get(f, captions.get(stem))
        if caption is None and with_captions and stem + ".txt" in present:
          caption = _read_text(storage.join(folder, stem + ".txt"), key).strip() or None
          self.caption_source = self.caption_source or "NAME.txt sidecars"
        entries.append((f, caption, None))
    if not entries:
      raise ConfigError(f"config.{key}={folder!r}: the folder holds no video files "
                        f"({', '.join(VIDEO_EXTENSIONS)})")
    # Deterministic selection: a seeded order, read until enough clips are in.
    order = np.random.default_rng(protocol_seed).permutation(len(entries))
    # Stories first: they are few, and their metrics need every one.
    self.entries = ([entries[i] for i in order if entries[i][2] is not None]
                    + [entries[i] for i in order if entries[i][2] is None])

  def describe(self) -> dict[str, Any]:
    return {"kind": "folder", "path": storage.absolute(self.folder),
            "files": len(self.entries), "captions": self.caption_source,
            "stories": sum(e[2] is not None for e in self.entries)}

  def __iter__(self) -> Iterator[Item]:
    for rel, caption, segments in self.entries:
      try:
        video = video_io.read_video(storage.join(self.folder, rel), fps=self.fps or None)
      except video_io.VideoDecodeError as e:
        self.skip(rel, e.kind, e.detail)
        continue
      info = {"window_frames": segments[0].get("window_frames")} if segments else {}
      yield Item(rel, video, caption, segments, info)


class CheckpointSet(VideoSet):
  """Samples of a MaskGIT workdir, on a prompt list cycled to `count` clips."""

  def __init__(self, config: ml_collections.ConfigDict, count: int):
    super().__init__()
    self.config = config
    self.options = SamplingOptions.from_config(config.sampling)
    prompts = [p.strip() for p in config.prompts.split(";") if p.strip()]
    if config.prompts_file:
      prompts += [line.strip() for line in _read_text(config.prompts_file, "prompts_file")
                  .splitlines() if line.strip() and not line.startswith("#")]
    self.prompt_source = "config.prompts / prompts_file" if prompts else "shapes_score.prompt_set"
    if not prompts:  # the balanced built-in benchmark prompts, one per clip
      prompts = shapes_score.prompt_set(count, seed=config.seed)
    self.prompts = [prompts[i % len(prompts)] for i in range(count)]
    g = config.generator
    try:
      self.gen = Generator.load(config.generated, step=None if g.step < 0 else g.step,
                                use_ema=g.use_ema, tokenizer_workdir=g.tokenizer_workdir or None)
    except FileNotFoundError as e:
      raise ConfigError(f"config.generated={config.generated!r} / config.generator.step: "
                        f"{e}") from None

  @property
  def num_frames(self) -> int:
    return self.gen.num_frames

  @property
  def resolution(self) -> int:
    return int(self.gen.config.input.resolution)

  def describe(self) -> dict[str, Any]:
    g = self.config.generator
    return {"kind": "maskgit", "path": storage.absolute(self.config.generated),
            "step": self.gen.step, "weights": "ema" if g.use_ema else "raw",
            "tokenizer": {"workdir": storage.absolute(self.gen.tokenizer_workdir),
                          "step": self.gen.tokenizer.step},
            "prompts": self.prompt_source, "num_samples": len(self.prompts),
            "seed": self.config.seed, "batch_size": self.config.batch_size,
            "seeds": "sample i draws from seed + i alone (its own key: batch size and padding "
                     "change nothing)",
            "sampling": dict(self.options.__dict__)}

  def __iter__(self) -> Iterator[Item]:
    bs = self.config.batch_size
    for b, first in enumerate(range(0, len(self.prompts), bs)):
      chunk = self.prompts[first:first + bs]
      # A short last batch is padded: one compilation.
      videos = self.gen.generate(chunk + [chunk[-1]] * (bs - len(chunk)),
                                 seed=self.config.seed + first, options=self.options)
      for k, (prompt, video) in enumerate(zip(chunk, videos)):
        yield Item(f"sample {first + k:04d}", video, prompt,
                   info={"seed": self.config.seed + first + k})


class RecordSet(VideoSet):
  """Clips of a random-access source (prepared shards, TFDS), in a seeded permutation."""

  def __init__(self, source: Any, description: dict[str, Any], seed: int):
    super().__init__()
    self.source, self.description = source, description
    if len(source) == 0:
      raise ConfigError(f"config.reference={description['path']!r}: holds no clips")
    self.order = np.random.default_rng(seed).permutation(len(source))

  def describe(self) -> dict[str, Any]:
    return {**self.description, "records": len(self.source)}

  def __iter__(self) -> Iterator[Item]:
    for i in self.order:
      example = self.source[int(i)]
      yield Item(f"record {int(i)}", np.asarray(example["frames"], np.uint8),
                 str(example.get("caption", "")) or None)


class ShapesSet(VideoSet):
  """Held-out clips of the built-in data at the working resolution (endless)."""

  def __init__(self, num_frames: int, resolution: int, seed: int):
    super().__init__()
    self.seed = seed + pipeline.EVAL_SEED_OFFSET
    self.source = synthetic.ShapesVideoSource(num_frames=num_frames, resolution=resolution,
                                              seed=self.seed)

  def describe(self) -> dict[str, Any]:
    return {"kind": "shapes", "seed": self.seed, "num_frames": self.source.num_frames,
            "resolution": self.source.resolution,
            "held_out": "the eval seed stream (protocol.seed + pipeline.EVAL_SEED_OFFSET), "
                        "not the training one"}

  def __iter__(self) -> Iterator[Item]:
    for i in range(len(self.source)):
      example = self.source[i]
      yield Item(f"shapes {i}", example["frames"], example["caption"])


def is_shards(path: str) -> bool:
  if "," in path or any(c in path for c in "*?["):
    return True
  if not storage.isdir(path):
    return path.endswith(".array_record")
  return bool(storage.glob(path, "*.array_record")
              or storage.glob(path, "video/*.array_record"))


def open_reference(config: ml_collections.ConfigDict, p: Protocol) -> VideoSet:
  ref = config.reference
  if ref == "shapes":
    return ShapesSet(p.span, p.resolution, p.seed)
  if ref.startswith("tfds:"):
    t = config.tfds
    try:
      source = sources.TfdsClipSource(ref[5:], split=t.split, data_dir=t.data_dir or None,
                                      frames_key=t.frames_key, caption_key=t.caption_key)
    except Exception as e:  # tfds raises many kinds; the message names the dataset
      raise ConfigError(f"config.reference={ref!r} (config.tfds.*): {e}") from None
    return RecordSet(source, {"kind": "tfds", "path": ref, "split": t.split}, p.seed)
  if is_shards(ref):
    spec = [s for s in ref.split(",") if s] if "," in ref else ref
    try:
      source = sources.ClipShardSource(spec, kind="video")
    except (FileNotFoundError, ValueError, shard_records.UnreadableShardsError) as e:
      raise ConfigError(f"config.reference={ref!r}: {e}") from None
    return RecordSet(source, {"kind": "shards", "path": ref,
                              "shards": len(source.paths)}, p.seed)
  if storage.isdir(ref):
    return FolderSet(ref, key="reference", protocol_seed=p.seed, fps=p.fps, with_captions=False)
  raise ConfigError(f"config.reference={ref!r}: not 'shapes', 'tfds:NAME', prepared shards "
                    "or a folder of videos")


def open_generated(config: ml_collections.ConfigDict) -> VideoSet:
  path = config.generated
  if storage.isdir(storage.join(path, "checkpoints")):
    return CheckpointSet(config, config.protocol.num_clips * (
        config.protocol.repeats if config.protocol.repeat_mode == "disjoint" else 1))
  return FolderSet(path, key="generated", protocol_seed=config.protocol.seed,
                   fps=config.protocol.fps, captions_path=config.captions)
