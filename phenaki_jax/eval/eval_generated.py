"""The evaluation of generated video (configs/eval.py:generated), job 'eval_generated'.

  python -m phenaki_jax.main --config=configs/eval.py:generated --workdir=OUT \
      --config.generated=runs/samples --config.reference=shapes

Every folder and file (generated, reference, captions, prompts_file, the CLIP
weights, OUT) may be local or gs:// (phenaki_jax/storage.py).

Two sets of clips:
  * generated: a folder of mp4/GIF files (a sample job's output, captions from
    its samples.json; a story's story.json gives its segments), or a MaskGIT
    workdir, sampled here on config.prompts / prompts_file / the built-in
    shapes prompts with seed + batch index, as the sample job seeds its batches;
  * reference: 'shapes' (held-out clips of the built-in data), prepared
    ArrayRecord shards, 'tfds:NAME', or a folder of videos.

Both stream through: a video is decoded (or sampled), cut into the protocol's
clips, brought to the working resolution on the host, and dropped once its I3D
logits (the FVD features) and per-clip scores are taken; the 224-px frames
exist only inside one device batch. Files that do not decode are skipped and
named in the report. Everything that can be wrong with the config or an empty
set fails before a network compiles, naming the key.

Writes OUT/report.json and OUT/report.png (phenaki_jax/eval/report.py).
"""
from __future__ import annotations

import dataclasses
import datetime
import time
from typing import Any, Iterable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm
from absl import logging

from phenaki_jax.config import errors, schema
from phenaki_jax.pretrained import perceptual
from phenaki_jax import distributed, storage
from phenaki_jax.config.schema import ConfigError
from phenaki_jax.data import synthetic, video_io
from phenaki_jax.eval import fvd as fvd_lib
from phenaki_jax import placement as placement_lib
from phenaki_jax.eval import report as report_lib
from phenaki_jax.eval import shapes_score, story_metrics
from phenaki_jax.eval.clip_score import clip_score, load_clip
from phenaki_jax.eval.video_sets import (REPEAT_MODES, RESIZE_POLICIES, CheckpointSet, Item,
                                         Protocol, VideoSet, cut_clips, describe_protocol,
                                         is_shards, open_generated, open_reference)

FVD_MIN_CLIPS, FVD_FEW_CLIPS_WHY = fvd_lib.FVD_MIN_CLIPS, fvd_lib.FVD_FEW_CLIPS_WHY
_THUMBNAILS = 6  # clips per set shown in report.png


def _peek(items: Iterable[Item], key: str, what: str) -> tuple[Item, Iterator[Item]]:
  """The first item, and an iterator that still yields it; an empty set fails naming the key."""
  it = iter(items)
  for first in it:
    def chained(first=first):
      yield first
      yield from it
    return first, chained()
  raise ConfigError(f"config.{key}: the {what} set has no readable video (every file was "
                    "skipped; see the warnings above)")


# --- Checks (before anything loads or compiles).

def validate(config: ml_collections.ConfigDict) -> None:
  req = errors.require
  req(bool(config.generated), "generated", config.generated,
      "is required: a folder of generated mp4/GIF files or a MaskGIT workdir, e.g. "
      "--config.generated=runs/samples")
  req(storage.isdir(config.generated), "generated", config.generated, "no such folder")
  req(isinstance(config.reference, str) and bool(config.reference), "reference",
      config.reference, "must be 'shapes', 'tfds:NAME', prepared shards or a folder of videos")
  if config.reference not in ("shapes",) and not config.reference.startswith("tfds:"):
    ref = config.reference
    req(is_shards(ref) or storage.isdir(ref), "reference", ref,
        "no such folder, shard file or glob (or use 'shapes' / 'tfds:NAME')")
  for key in ("captions", "prompts_file", "clip.path", "clip.merges_path"):
    value = errors.flat_keys(config)[key]
    req(not value or storage.exists(value), key, value, "no such file")
  p = config.protocol
  errors.positive_ints(config, [
      "protocol.num_clips", "protocol.frame_stride", "protocol.clips_per_video",
      "protocol.repeats", "protocol.batch_size", "batch_size", "clip.batch_size"])
  if p.fvd:
    req(p.num_frames == -1 or (isinstance(p.num_frames, int)
                               and p.num_frames >= perceptual.I3D_MIN_FRAMES_FOR_LOGITS),
        "protocol.num_frames", p.num_frames,
        f"must be >= {perceptual.I3D_MIN_FRAMES_FOR_LOGITS} (I3D needs that many frames), or "
        "-1 for the generated clips' length; protocol.fvd=False skips FVD")
    req(isinstance(p.fvd_resolution, int)
        and p.fvd_resolution >= perceptual.I3D_MIN_RESOLUTION_FOR_LOGITS,
        "protocol.fvd_resolution", p.fvd_resolution,
        f"must be >= {perceptual.I3D_MIN_RESOLUTION_FOR_LOGITS} for I3D logits (224 is standard)")
  else:
    req(p.num_frames == -1 or (isinstance(p.num_frames, int) and p.num_frames >= 1),
        "protocol.num_frames", p.num_frames, "must be >= 1, or -1")
  req(p.resolution == -1 or (isinstance(p.resolution, int) and p.resolution >= 8),
      "protocol.resolution", p.resolution, "must be >= 8, or -1 for the generated side")
  req(p.fps >= 0, "protocol.fps", p.fps, "must be >= 0 (0: every stored frame)")
  req(p.resize in RESIZE_POLICIES, "protocol.resize", p.resize,
      f"must be one of {RESIZE_POLICIES}")
  req(p.repeat_mode in REPEAT_MODES, "protocol.repeat_mode", p.repeat_mode,
      f"must be one of {REPEAT_MODES}")
  req(isinstance(p.seed, int) and p.seed >= 0, "protocol.seed", p.seed, "must be >= 0")
  req(isinstance(p.center_crop, bool), "protocol.center_crop", p.center_crop,
      "must be True or False")


def resolve_protocol(config: ml_collections.ConfigDict, first: Item | None,
                     gen_set: VideoSet) -> Protocol:
  """num_frames / resolution -1 -> the generated clips'; checks clip length against it."""
  p = Protocol.from_config(config.protocol)
  if isinstance(gen_set, CheckpointSet):
    length, side = gen_set.num_frames, gen_set.resolution
    total = length
  else:
    total, side = first.video.shape[0], min(first.video.shape[1:3])
    length = total
    if first.segments:  # a story: -1 means one generator window (story.json), not the story
      length = int(first.info.get("window_frames") or min(
          s["end_frame"] - s["start_frame"] for s in first.segments))
  p = dataclasses.replace(p, num_frames=length if p.num_frames == -1 else p.num_frames,
                          resolution=side if p.resolution == -1 else p.resolution)
  if p.fvd and p.num_frames < perceptual.I3D_MIN_FRAMES_FOR_LOGITS:
    raise ConfigError(
        f"config.protocol.num_frames={config.protocol.num_frames}: the generated clips have "
        f"{length} frames, but I3D (FVD) needs at least {perceptual.I3D_MIN_FRAMES_FOR_LOGITS}; "
        "set protocol.fvd=False to score them without FVD")
  if p.span > total:
    raise ConfigError(
        f"config.protocol.num_frames={p.num_frames} with protocol.frame_stride={p.frame_stride} "
        f"needs {p.span} frames per clip, but the generated clips have {total}")
  if p.fvd and p.fvd_resolution < perceptual.I3D_MIN_RESOLUTION_FOR_LOGITS:
    raise ConfigError(f"config.protocol.fvd_resolution={p.fvd_resolution}: too small for I3D")
  return p


# --- FVD features, split over the devices of every process.

class I3DLogits:
  """(N, T, r, r, 3) uint8 clips -> (N, 400) float64 I3D logits, in fixed-size batches.

  A batch is one global array split over an evaluation mesh with devices of
  every process (placement.default_mesh: all of them when they divide the
  batch size); one compilation for every batch, the last is padded. Every
  process streams the same clips and gets the same logits back (replicated),
  so the report does not depend on the process count. The weights are
  replicated jit arguments; the 224-px frames exist only inside the jitted call.
  """

  def __init__(self, p: Protocol):
    self.batch_size = p.batch_size
    self.placement = placement_lib.Placement(
        placement_lib.default_mesh(p.batch_size, "protocol.batch_size"))
    self.placement.check_batch(p.batch_size, "protocol.batch_size")
    self.num_devices = self.placement.num_devices
    self._variables = None
    size, antialias = p.fvd_resolution, p.resize == "bilinear_antialias"

    def logits(variables, clips):
      x = clips.astype(jnp.float32) / 127.5 - 1.0
      b, t, h, w, c = x.shape
      if (h, w) != (size, size):
        x = jax.image.resize(x, (b, t, size, size, c), "bilinear", antialias=antialias)
      return perceptual.i3d_features(variables, x, endpoint="Logits", resolution=size)

    self._fn = distributed.CompiledTogether(
        jax.jit(logits, in_shardings=(self.placement.replicated, self.placement.batch),
                out_shardings=self.placement.replicated), "reference_i3d_features")

  def __call__(self, clips: np.ndarray) -> np.ndarray:
    if self._variables is None:
      self._variables = self.placement.put_replicated(perceptual.i3d_variables())
    n = len(clips)
    batch = np.pad(clips, [(0, self.batch_size - n)] + [(0, 0)] * 4, mode="edge")
    with jax.set_mesh(self.placement.mesh):  # a sampling generator may have entered its own
      out = self._fn(self._variables, self.placement.put_batch(batch))
    return placement_lib.to_host(out).astype(np.float64)[:n]


def fvd_runs(gen: np.ndarray, ref: np.ndarray, p: Protocol) -> tuple[list[float], int]:
  """FVD per repeat, and the clips per set behind each."""
  if p.repeats == 1:
    return [fvd_lib.fvd_from_features(gen, ref)], min(len(gen), len(ref))
  if p.repeat_mode == "disjoint":
    kg, kr = len(gen) // p.repeats, len(ref) // p.repeats
    return ([fvd_lib.fvd_from_features(gen[i * kg:(i + 1) * kg], ref[i * kr:(i + 1) * kr])
             for i in range(p.repeats)], min(kg, kr))
  rng = np.random.default_rng(p.seed)
  runs = [fvd_lib.fvd_from_features(gen[rng.integers(0, len(gen), len(gen))],
                                    ref[rng.integers(0, len(ref), len(ref))])
          for _ in range(p.repeats)]
  return runs, min(len(gen), len(ref))


# --- Streaming a set.

@dataclasses.dataclass
class SetResult:
  features: list[np.ndarray] = dataclasses.field(default_factory=list)
  clips: int = 0
  videos: int = 0
  per_clip: list[dict[str, Any]] = dataclasses.field(default_factory=list)
  stories: list[dict[str, Any]] = dataclasses.field(default_factory=list)
  thumbnails: list[np.ndarray] = dataclasses.field(default_factory=list)

  def feature_array(self) -> np.ndarray:
    return np.concatenate(self.features) if self.features else np.zeros((0, 400))


class ClipScorer:
  """CLIP score of (video, caption) pairs, batched by video shape."""

  def __init__(self, bundle: Any, batch_size: int, score_fn: Any):
    self.bundle, self.batch_size, self.score_fn = bundle, batch_size, score_fn
    self.pending: dict[tuple, list[tuple[dict, np.ndarray, str]]] = {}

  def add(self, record: dict[str, Any], video: np.ndarray, text: str) -> None:
    queue = self.pending.setdefault(video.shape, [])
    queue.append((record, video, text))
    if len(queue) >= self.batch_size:
      self.flush(video.shape)

  def flush(self, shape: tuple | None = None) -> None:
    for s in ([shape] if shape is not None else list(self.pending)):
      queue = self.pending.pop(s, [])
      if queue:
        out = self.score_fn(self.bundle, np.stack([v for _, v, _ in queue]),
                            [t for _, _, t in queue], self.batch_size)
        for k, (record, _, _) in enumerate(queue):
          record["clip_score"] = float(out["clip_score"][k])
          record["clip_cosine"] = float(out["cosine"][k])


def stream_set(items: Iterable[Item], owner: VideoSet, name: str, p: Protocol,
               i3d: I3DLogits | None, *, score: bool, clip: ClipScorer | None) -> SetResult:
  """Consumes a set until clips_wanted clips are in; features, per-clip and story scores."""
  result, pending = SetResult(), []

  def flush():
    if pending and i3d is not None:
      result.features.append(i3d(np.stack(pending)))
    pending.clear()

  bar = tqdm.tqdm(total=p.clips_wanted, desc=name, unit="clip",
                  disable=jax.process_index() != 0)
  for item in items:
    if result.clips >= p.clips_wanted:
      break
    clips = cut_clips(item.video, p, 0 if item.segments else p.clips_per_video)
    clips = clips[:p.clips_wanted - result.clips]
    if not clips:
      owner.skip(item.name, video_io.TOO_SHORT,
                 f"{len(item.video)} frames; the protocol's clips need {p.span} "
                 "(protocol.num_frames, protocol.frame_stride)")
      continue
    result.videos += 1
    for c in clips[:_THUMBNAILS - len(result.thumbnails)]:
      result.thumbnails.append(c[len(c) // 2])
    if score:
      record = {"name": item.name, "caption": item.caption, "frames": list(item.video.shape),
                "clips": len(clips), **item.info}
      if item.segments:
        record["story"] = score_story(item, clip)
        result.stories.append(record)
      else:
        if item.caption and shapes_score.is_shapes_prompt(item.caption):
          reading = shapes_score.read_prompt_object(item.video, item.caption)
          record["shapes"] = shapes_score.score_reading(reading, item.caption)
          record["shapes_area_ratio"] = shapes_score.area_ratio(
              item.caption, reading, item.video.shape[0], item.video.shape[1])
        if clip is not None and item.caption:
          clip.add(record, item.video, item.caption)
        result.per_clip.append(record)
    for c in clips:
      pending.append(c)
      if len(pending) == p.batch_size:
        flush()
    result.clips += len(clips)
    bar.update(len(clips))
  flush()
  bar.close()
  if clip is not None:
    clip.flush()
  return result


def score_story(item: Item, clip: ClipScorer | None) -> dict[str, Any]:
  """Story metrics (shapes grammar) and per-segment CLIP score against each segment's prompt."""
  segments = [dict(s) for s in item.segments]
  out: dict[str, Any] = {"num_frames": int(len(item.video))}
  prompts = [s.get("prompt", "") for s in segments]
  if segments and all(shapes_score.is_shapes_prompt(pr) for pr in prompts):
    scored = story_metrics.score_story(item.video, segments)
    out.update(segment_accuracy=scored["segment_accuracy"], keeps_colour=scored["keeps_colour"],
               keeps_shape=scored["keeps_shape"], seam_ratio=scored["seam_ratio"])
    for seg, s in zip(segments, scored["segments"]):
      seg["shapes"] = s["correct"]
  else:
    starts = [w for s in segments for w in s.get("window_starts", [s.get("start_frame", 0)])]
    out["seam_ratio"] = story_metrics.seam_ratio(item.video, starts)
  if clip is not None:
    for seg in segments:
      frames = item.video[seg["start_frame"]:seg["end_frame"]]
      if len(frames) and seg.get("prompt"):
        r = clip.score_fn(clip.bundle, frames[None], [seg["prompt"]], clip.batch_size)
        seg["clip_score"] = float(r["clip_score"][0])
        seg["clip_cosine"] = float(r["cosine"][0])
  out["segments"] = [{k: s.get(k) for k in ("index", "prompt", "start_frame", "end_frame",
                                            "window_starts", "shapes", "clip_score",
                                            "clip_cosine") if k in s} for s in segments]
  return out


# --- The job.

def _mean(values: list[float]) -> float | None:
  values = [v for v in values if v is not None and np.isfinite(v)]
  return float(np.mean(values)) if values else None


def summarise(gen: SetResult) -> dict[str, Any]:
  """Scalar metrics of the generated set's per-clip and story scores."""
  metrics: dict[str, Any] = {}
  shapes = [r["shapes"] for r in gen.per_clip if "shapes" in r]
  if shapes:
    for k, v in shapes_score.accuracy(shapes).items():
      metrics[f"shapes/{k}"] = v
    ratios = shapes_score.mean_area_ratios((r["caption"], r.get("shapes_area_ratio"))
                                           for r in gen.per_clip if "shapes" in r)
    for size in synthetic.SIZES:
      if ratios and size in ratios:
        metrics[f"shapes/area_ratio_{size}"] = ratios[size]
  clip_scores = [r["clip_score"] for r in gen.per_clip if "clip_score" in r]
  if clip_scores:
    metrics["clip_score"] = _mean(clip_scores)
    metrics["clip_cosine"] = _mean([r.get("clip_cosine") for r in gen.per_clip])
  if gen.stories:
    stories = [s["story"] for s in gen.stories]
    segs = [seg for s in stories for seg in s["segments"]]
    metrics["story/num_stories"] = float(len(stories))
    metrics["story/seam_ratio"] = _mean([s.get("seam_ratio") for s in stories])
    if any("shapes" in seg for seg in segs):
      acc = shapes_score.accuracy([seg["shapes"] for seg in segs if "shapes" in seg])
      for k, v in acc.items():
        metrics["story/num_segments" if k == "num_clips" else f"story/segment_{k}"] = v
      metrics["story/keeps_colour"] = _mean([s.get("keeps_colour") for s in stories])
      metrics["story/keeps_shape"] = _mean([s.get("keeps_shape") for s in stories])
    if any("clip_score" in seg for seg in segs):
      metrics["story/clip_score"] = _mean([seg.get("clip_score") for seg in segs])
  return metrics


def load_clip_scorer(config: ml_collections.ConfigDict) -> ClipScorer | None:
  if not config.clip.path:
    return None
  # Frames and captions split over devices of every process, as I3D's clips.
  mesh = placement_lib.default_mesh(config.clip.batch_size, "clip.batch_size")
  bundle = load_clip(config.clip.path, config.clip.merges_path or None, mesh=mesh)
  return ClipScorer(bundle, config.clip.batch_size, clip_score)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Evaluates the generated set; writes report.json and report.png; returns the report."""
  start = time.perf_counter()
  config = schema.complete(config)
  validate(config)

  # The sets, each checked non-empty before any network compiles.
  gen_set = open_generated(config)
  first, gen_items = (None, iter(gen_set)) if isinstance(gen_set, CheckpointSet) else _peek(
      gen_set, "generated", "generated")
  p = resolve_protocol(config, first, gen_set)
  ref_set = open_reference(config, p)
  _, ref_items = _peek(ref_set, "reference", "reference")
  logging.info("evaluating %s against %s: %d clips per set, %d frames at %dpx",
               config.generated, config.reference, p.clips_wanted, p.num_frames, p.resolution)
  clip = load_clip_scorer(config)
  i3d = I3DLogits(p) if p.fvd else None

  t0 = time.perf_counter()
  gen = stream_set(gen_items, gen_set, "generated", p, i3d, score=True, clip=clip)
  t1 = time.perf_counter()
  # The reference set serves FVD only: without it, it is just checked readable.
  ref = (stream_set(ref_items, ref_set, "reference", p, i3d, score=False, clip=None)
         if p.fvd else SetResult())
  t2 = time.perf_counter()
  if gen.clips == 0:
    raise ConfigError(f"config.generated={config.generated!r}: no clip of the protocol's "
                      f"{p.span} frames in the generated set")

  warnings, metrics = [], {}
  if p.fvd:
    if ref.clips < 2 or gen.clips < 2:
      raise ConfigError(f"config.protocol.num_clips={p.num_clips}: FVD needs at least 2 clips "
                        f"per set; got {gen.clips} generated, {ref.clips} reference")
    runs, per_fvd = fvd_runs(gen.feature_array(), ref.feature_array(), p)
    metrics["fvd"] = float(np.mean(runs))
    if len(runs) > 1:
      metrics["fvd_std"] = float(np.std(runs, ddof=1))
    metrics["fvd_clips"] = float(per_fvd)
    if per_fvd < FVD_MIN_CLIPS:
      warnings.append(f"FVD from {per_fvd} clips per set (< {FVD_MIN_CLIPS}): "
                      + FVD_FEW_CLIPS_WHY)
    for which, got in (("generated", gen.clips), ("reference", ref.clips)):
      if got < p.clips_wanted:
        warnings.append(f"the {which} set gave {got} clips of the {p.clips_wanted} asked for "
                        "(protocol.num_clips x repeats)")
  else:
    runs = []
    warnings.append("FVD not computed (protocol.fvd=False); the reference set was not read")
  metrics.update(summarise(gen))
  skipped = ([{"set": "generated", **s} for s in gen_set.skipped]
             + [{"set": "reference", **s} for s in ref_set.skipped])
  if skipped:
    warnings.append(f"{len(skipped)} file(s) skipped: "
                    + ", ".join(f"{s['file']} ({s['kind']})" for s in skipped))
  for w in warnings:
    logging.warning("%s", w)

  report = {
      "job": "eval_generated",
      "name": config.name or storage.basename(storage.absolute(config.generated)),
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "generated": {**gen_set.describe(), "clips": gen.clips, "videos": gen.videos},
      "reference": {**ref_set.describe(), "clips": ref.clips, "videos": ref.videos},
      "metrics": metrics,
      "fvd_runs": runs,
      # CLIP scores depend on the CLIP model: say which.
      "clip": ({"path": storage.absolute(config.clip.path),
                "merges_path": config.clip.merges_path or None,
                "model": str(getattr(clip.bundle, "source", config.clip.path))}
               if clip is not None else None),
      # Verbatim, then what the -1s resolved to and what each field means.
      "protocol": {**config.protocol.to_dict(), "resolved": describe_protocol(p)},
      "warnings": warnings,
      "skipped": skipped,
      "clips": gen.per_clip,
      "stories": gen.stories,
      "seconds": {"generated": round(t1 - t0, 3), "reference": round(t2 - t1, 3),
                  "total": round(time.perf_counter() - start, 3)},
      "device": f"{jax.devices()[0].platform} ({jax.devices()[0].device_kind}) x "
                f"{i3d.num_devices if i3d else 1}",
      "config": config.to_dict(),
  }
  paths = {}
  if jax.process_index() == 0:
    paths = report_lib.write_report(workdir, report, gen.thumbnails, ref.thumbnails)
  logging.info("%s: %s -> %s", report["name"], report_lib.summary_line(metrics),
               paths.get("json"))
  return {**report, "json_path": paths.get("json"), "png_path": paths.get("png")}
