"""The sampling job (configs/sample.py): prompts in, videos out.

It runs on one mesh over every device of every process (config.mesh.shape;
the generator's weights, its frozen text encoder and tokenizer laid out by
their rules, each prompt batch split over the batch axes). In a multi-host
job every process runs it with the same config: all of them compute the
same batches (the sampler is collective), and only process 0 writes files.

Writes into WORKDIR, a local folder or gs:// (a story, config.story / config.storyboard, writes story.mp4,
story.gif, story.png and story.json instead; see phenaki_jax/sampling/story.py):
  0000.mp4, 0000.gif, 0001.mp4, ...  one video per sample, in prompt order
  samples.png       contact sheet: a strip per sample, its prompt above its frames
  samples.json      prompts, seeds, files, settings, the generator and
                    tokenizer checkpoints, timings; for prompts of the built-in
                    shapes grammar also what the scorer reads from each clip
                    and the per-attribute prompt accuracy
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import io
import json
import time
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np
import tqdm
from absl import logging
from PIL import Image, ImageDraw, ImageFont

from phenaki_jax.config import schema
from phenaki_jax import metrics
from phenaki_jax import sharding
from phenaki_jax import storage
from phenaki_jax.config import mesh as config_mesh
from phenaki_jax.config import sampling as sampling_section
from phenaki_jax.config.schema import ConfigError
from phenaki_jax.data import video_io
from phenaki_jax.eval import shapes_score
from phenaki_jax.generator import Generator, SamplingOptions
from phenaki_jax.sampling import start as start_lib
from phenaki_jax.sampling import story as story_lib


def read_prompts(config: ml_collections.ConfigDict) -> list[str]:
  """config.prompts, then the lines of config.prompts_file (local or gs://), then
  config.shapes_eval prompts."""
  prompts = [p.strip() for p in config.prompts.split(";") if p.strip()]
  if config.prompts_file:
    prompts += read_prompts_file(config.prompts_file)
  if config.shapes_eval:
    prompts += shapes_score.prompt_set(config.shapes_eval, seed=config.seed)
  if not prompts:
    raise ConfigError("nothing to sample: set config.prompts ('first;second'), "
                      "config.prompts_file, or config.shapes_eval")
  return prompts


def read_prompts_file(path: str, key: str = "prompts_file") -> list[str]:
  """The non-empty lines of a prompt file (local or gs://), '#' lines left out."""
  try:
    text = storage.read_text(path)
  except storage.StorageNotFoundError:
    raise ConfigError(f"config.{key}={path!r}: no such file") from None
  except (storage.StorageError, UnicodeDecodeError) as e:
    raise ConfigError(f"config.{key}={path!r}: cannot read it: {e}") from None
  return [line.strip() for line in text.splitlines()
          if line.strip() and not line.startswith("#")]


def write_png(path: str, image: np.ndarray) -> None:
  """An RGB uint8 image as a PNG, written whole (local or gs://)."""
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format="PNG")
  storage.write_bytes(path, buffer.getvalue())


def labelled_strips(videos: Sequence[np.ndarray], labels: Sequence[str],
                    max_frames: int = 11, upscale: int = 1) -> np.ndarray:
  """One row per video (up to max_frames evenly spaced frames) under its label."""
  font = ImageFont.load_default()
  gap, label_h = 2, 12
  rows = []
  for video, label in zip(videos, labels):
    t = video.shape[0]
    picks = np.unique(np.linspace(0, t - 1, min(t, max_frames)).round().astype(int))
    frames = [np.asarray(Image.fromarray(video[i]).resize(
        (video.shape[2] * upscale, video.shape[1] * upscale), Image.NEAREST)) for i in picks]
    h, w = frames[0].shape[:2]
    row = np.full((label_h + h, len(frames) * (w + gap) - gap, 3), 255, np.uint8)
    for k, frame in enumerate(frames):
      row[label_h:, k * (w + gap):k * (w + gap) + w] = frame
    image = Image.fromarray(row)
    ImageDraw.Draw(image).text((1, 0), label, fill=(0, 0, 0), font=font)
    rows.append(np.asarray(image))
  width = max(r.shape[1] for r in rows)
  rows = [np.pad(r, ((0, gap), (0, width - r.shape[1]), (0, 0)), constant_values=255)
          for r in rows]
  return np.concatenate(rows, axis=0)


def tokenizer_ceiling(gen: Generator, prompts: Sequence[str], num_frames: int,
                      resolution: int, batch_size: int) -> dict[str, float] | None:
  """Shapes accuracy of the tokenizer's reconstructions of each prompt's dataset clip.

  None when no prompt has a reference clip (no shapes prompt names a size).
  """
  pairs = [(p, shapes_score.reference_clip(p, num_frames, resolution))
           for p in prompts if shapes_score.is_shapes_prompt(p)]
  pairs = [(p, c) for p, c in pairs if c is not None]
  if not pairs:
    return None
  scores = []
  for first in range(0, len(pairs), batch_size):
    chunk = pairs[first:first + batch_size]
    # Padded to the batch size: one compilation, as for sampling.
    clips = np.stack([c for _, c in chunk] + [chunk[-1][1]] * (batch_size - len(chunk)))
    recon = metrics.to_uint8(np.asarray(gen.tokenizer.decode(gen.tokenizer.encode(clips))))
    scores += [shapes_score.score_clip(r, p) for (p, _), r in zip(chunk, recon)]
  return shapes_score.accuracy(scores)


def _format_accuracy(acc: dict[str, float]) -> str:
  return " ".join(f"{k}={acc[k]:.3f}" for k in (*shapes_score.ATTRIBUTES, "all") if k in acc)


def _write_json(path: str, payload: dict[str, Any]) -> None:
  # Whole or not at all (storage.write_text); keys in the report's own order.
  storage.write_text(path, json.dumps(payload, indent=2) + "\n")


def is_writer() -> bool:
  """Process 0 writes the job's files; the others compute the same and write nothing."""
  return jax.process_index() == 0


def load_generator(config: ml_collections.ConfigDict,
                   devices: Sequence[jax.Device] | None = None,
                   check_batch: bool = True) -> Generator:
  """config.generator on the sampling mesh (config.mesh.shape over `devices`, default
  every device of every process), its shape and config.batch_size checked first,
  before any weight is read."""
  g = config.generator
  step = None if g.step < 0 else g.step
  devices = list(jax.devices() if devices is None else devices)
  gen_config = Generator.read_config(g.workdir, step)
  if check_batch:
    shape = sampling_section.check_mesh(config, gen_config, len(devices))
  else:
    try:
      shape = config_mesh.resolve_mesh_shape(config.mesh.shape, len(devices))
    except ValueError as e:
      raise ConfigError(str(e)) from None
  mesh = sharding.make_mesh(shape, devices)
  try:
    return Generator.load(g.workdir, step=step, use_ema=g.use_ema,
                          tokenizer_workdir=g.tokenizer_workdir or None, mesh=mesh)
  except ValueError as e:
    if isinstance(e, ConfigError):
      raise
    raise ConfigError(f"config.mesh.shape={tuple(config.mesh.shape)}: {e}") from None


def run(config: ml_collections.ConfigDict, workdir: str, *,
        devices: Sequence[jax.Device] | None = None) -> dict[str, Any]:
  """Samples every prompt, writes the files; returns the report (as in samples.json).

  `devices`: the sampling mesh's devices (default every device of every process).
  """
  start = time.perf_counter()
  config = schema.complete(config)
  schema.validate_sample(config)
  options = SamplingOptions.from_config(config.sampling)
  story_mode = bool(config.story or config.storyboard)
  segments = read_story(config) if story_mode else []
  prompts = [] if story_mode else read_prompts(config)
  formats = [f.strip() for f in config.output.formats.split(",") if f.strip()]

  # A story samples one window at a time: config.batch_size is not used.
  gen = load_generator(config, devices, check_batch=not story_mode)
  logging.info("sampling on mesh %s over %d devices of %d process(es)", dict(gen.mesh.shape),
               gen.mesh.devices.size, jax.process_count())
  begin = read_start(config, gen)
  if story_mode:
    return run_story(config, workdir, gen, segments, options, formats, start, begin)
  return run_prompts(config, workdir, gen, prompts, options, formats, start, begin)


def read_start(config: ml_collections.ConfigDict, gen: Generator) -> start_lib.Start | None:
  """config.start's frames, sized for the generator, or None; errors name the key and file."""
  if not config.start:
    return None
  try:
    begin = start_lib.load_start(config.start, gen, context_frames=config.start_frames,
                                 fps=config.output.fps)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  if not gen.trained_to_continue:
    logging.warning("config.start=%r: this generator trained with prefix.probability=0, so it "
                    "was never taught to continue given frames (the story prefix task teaches "
                    "it; benchmarks/RESULTS.md); expect a weak continuation", config.start)
  logging.info("starting every video from %s (%d frame(s) of %s)", config.start,
               len(begin.frames), begin.kind)
  return begin


def run_prompts(config: ml_collections.ConfigDict, workdir: str, gen: Generator,
                prompts: list[str], options: SamplingOptions, formats: list[str],
                start: float, begin: start_lib.Start | None = None) -> dict[str, Any]:
  """Every prompt × samples_per_prompt in batches: the videos, samples.png, samples.json."""
  g = config.generator
  num_frames = None if config.num_frames < 0 else config.num_frames
  logging.info("sampling %d prompt(s) x %d from %s step %d (%d steps, guidance %.3g)",
               len(prompts), config.samples_per_prompt, g.workdir, gen.step, options.num_steps,
               options.guidance_scale)
  jobs = [(p, k) for p in prompts for k in range(config.samples_per_prompt)]
  writer = is_writer()
  if writer:
    storage.makedirs(workdir)

  records, videos, readings, sample_seconds = [], [], [], 0.0
  bs = config.batch_size
  batches = range(0, len(jobs), bs)
  for first in tqdm.tqdm(batches, desc="sampling", unit="batch",
                         disable=jax.process_index() != 0):
    chunk = jobs[first:first + bs]
    # A short last batch is padded to the batch size: one compilation.
    batch_prompts = [p for p, _ in chunk] + [chunk[-1][0]] * (bs - len(chunk))
    t0 = time.perf_counter()
    # Sample i draws from seed + i alone, whatever the batch size or process count.
    if begin is None:
      batch = gen.generate(batch_prompts, seed=config.seed + first, options=options,
                           num_frames=num_frames)[:len(chunk)]
    else:
      batch = gen.continue_from(batch_prompts, begin.frames, seed=config.seed + first,
                                options=options,
                                include_start=config.start_in_output)[:len(chunk)]
    sample_seconds += time.perf_counter() - t0
    for (prompt, k), video in zip(chunk, batch):
      index = len(records)
      files = []
      for fmt in formats:
        name = f"{index:04d}.{fmt}"
        path = storage.join(workdir, name)  # video_io writes each file whole, local or gs://
        if writer and fmt == "mp4":
          video_io.write_video(path, video, fps=config.output.fps)
        elif writer:
          video_io.write_gif(path, video, fps=config.output.fps)
        files.append(name)
      record = {"index": index, "prompt": prompt, "sample": k, "seed": config.seed + index,
                "files": files, "frames": list(video.shape)}
      if shapes_score.is_shapes_prompt(prompt):
        reading = shapes_score.read_prompt_object(video, prompt)
        readings.append((prompt, reading))
        record["shapes"] = {"read": reading.as_dict(),
                            "correct": shapes_score.score_reading(reading, prompt)}
      records.append(record)
      videos.append(video)

  if writer:
    upscale = max(1, 128 // videos[0].shape[1])
    grid = labelled_strips(videos, [f"{r['index']:04d} {r['prompt']}" for r in records],
                           upscale=upscale)
    write_png(storage.join(workdir, "samples.png"), grid)
  scored = [r["shapes"]["correct"] for r in records if "shapes" in r]
  # Every process: the tokenizer runs collectively on the mesh.
  ceiling = (tokenizer_ceiling(gen, list(dict.fromkeys(r["prompt"] for r in records
                                                      if "shapes" in r)),
                               num_frames or gen.num_frames, videos[0].shape[1], bs)
             if scored else None)
  report = {
      "job": "sample",
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "generator": {"workdir": storage.absolute(g.workdir), "step": gen.step,
                    "weights": "ema" if g.use_ema else "raw",
                    "token_grid": list(gen.token_grid)},
      "tokenizer": {"workdir": storage.absolute(gen.tokenizer_workdir),
                    "step": gen.tokenizer.step},
      "sampling": {**options.__dict__, "batch_size": bs, "seed": config.seed},
      "start": None if begin is None else {**begin.describe(),
                                           "in_output": bool(config.start_in_output)},
      "samples": records,
      "shapes_accuracy": shapes_score.accuracy(scored) if scored else None,
      "tokenizer_ceiling": ceiling,
      "object_area_ratio": shapes_score.mean_area_ratios(
          (p, shapes_score.area_ratio(p, r, videos[0].shape[0], videos[0].shape[1]))
          for p, r in readings),
      "seconds": {"sampling": round(sample_seconds, 3),
                  "total": round(time.perf_counter() - start, 3)},
      "device": f"{jax.devices()[0].platform} ({jax.devices()[0].device_kind})",
      "mesh": dict(gen.mesh.shape),
      "processes": jax.process_count(),
      "config": config.to_dict(),
  }
  if writer:
    _write_json(storage.join(workdir, "samples.json"), report)
  if scored:
    logging.info("shapes prompt accuracy over %d clips: %s", len(scored),
                 _format_accuracy(report["shapes_accuracy"]))
  if ceiling:
    logging.info("the tokenizer's ceiling (its reconstructions of the dataset's clips for "
                 "these prompts): %s", _format_accuracy(ceiling))
  if report["object_area_ratio"]:
    logging.info("object area over the dataset's, by prompt size: %s", " ".join(
        f"{k} {v:.2f}x" for k, v in report["object_area_ratio"].items() if k != "num_clips"))
  logging.info("%s %d sample(s) %s %s (%.1f s sampling)", "wrote" if writer else "sampled",
               len(records), "to" if writer else "for process 0 to write to", workdir,
               sample_seconds)
  return report



class _Discard:
  """The story's frame sink on the processes that write nothing."""

  def write(self, frames: np.ndarray) -> None:
    del frames


def read_story(config: ml_collections.ConfigDict) -> list[story_lib.Segment]:
  """The segments of config.storyboard (a file) or config.story ('first;second;…').

  A storyboard's own `start` becomes config.start (refused when both are set).
  """
  try:
    if config.storyboard:
      segments, start = story_lib.read_storyboard(config.storyboard)
      if start and config.start:
        raise ValueError(f"its start {start!r} and config.start={config.start!r} both set "
                         "one; keep one")
      if start:
        config.start = start
      return segments
    prompts = [p.strip() for p in config.story.split(";") if p.strip()]
    return story_lib.parse_segments(prompts, where="config.story")
  except (ValueError, FileNotFoundError, TypeError) as e:
    key = "config.storyboard" if config.storyboard else "config.story"
    raise ConfigError(f"{key}: {e}") from None


def run_story(config: ml_collections.ConfigDict, workdir: str, gen: Generator,
              segments: list[story_lib.Segment], options: SamplingOptions, formats: list[str],
              start: float, begin: start_lib.Start | None = None) -> dict[str, Any]:
  """One continuous video from the storyboard: story.mp4 (+ .gif), story.png, story.json."""
  d = config.story_defaults
  segments = [s if s.num_frames or s.seconds else dataclasses.replace(s, num_frames=d.num_frames)
              for s in segments]
  writer = is_writer()
  if writer:
    storage.makedirs(workdir)
  mp4 = storage.join(workdir, "story.mp4")
  scores = {}

  def score(i: int, frames: np.ndarray) -> None:
    prompt = segments[i].prompt
    if shapes_score.is_shapes_prompt(prompt):
      reading = shapes_score.read_prompt_object(frames, prompt)
      scores[i] = {"read": reading.as_dict(),
                   "correct": shapes_score.score_reading(reading, prompt)}

  t0 = time.perf_counter()
  # Frames stream into the mp4, which appears whole (local or gs://) when the writer closes.
  # Every process generates the story (collectively); only process 0 keeps the frames.
  video = (video_io.VideoWriter(mp4, fps=config.output.fps) if writer
           else contextlib.nullcontext(_Discard()))
  with video as sink:
    try:
      result = story_lib.generate_story(
          gen, segments, sink=sink.write, options=options, seed=config.seed,
          context_frames=d.context_frames, fps=config.output.fps, on_segment=score,
          start=None if begin is None else begin.frames,
          start_in_output=config.start_in_output)
    except ValueError as e:
      raise ConfigError(f"story_defaults / storyboard: {e}") from None
  seconds = time.perf_counter() - t0
  files = ["story.mp4"]
  if "gif" in formats:
    if writer:
      # A GIF is written whole: for very long stories use mp4 only.
      video_io.write_gif(storage.join(workdir, "story.gif"),
                         video_io.read_video(mp4, fps=None), fps=config.output.fps)
    files.append("story.gif")
  by_segment: dict[str, list[np.ndarray]] = {}
  for label, frame in result.strip_frames:
    by_segment.setdefault(label, []).append(frame)
  if writer:
    upscale = max(1, 128 // result.strip_frames[0][1].shape[0])
    strip = labelled_strips([np.stack(v) for v in by_segment.values()], list(by_segment),
                            upscale=upscale)
    write_png(storage.join(workdir, "story.png"), strip)
  for i, record in enumerate(result.segments):
    if i in scores:
      record["shapes"] = scores[i]
  scored = [s["correct"] for s in scores.values()]
  report = {
      "job": "sample/story",
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "generator": {"workdir": storage.absolute(config.generator.workdir), "step": gen.step},
      "tokenizer": {"workdir": storage.absolute(gen.tokenizer_workdir),
                    "step": gen.tokenizer.step},
      "window_frames": story_lib.StoryWindow(gen).frames,
      "num_frames": result.num_frames, "fps": config.output.fps,
      "files": files, "segments": result.segments,
      "start": None if begin is None else {**begin.describe(),
                                           "in_output": bool(config.start_in_output)},
      "shapes_accuracy": shapes_score.accuracy(scored) if scored else None,
      "sampling": dict(options.__dict__),
      "seconds": {"sampling": round(seconds, 3), "total": round(time.perf_counter() - start, 3)},
      "mesh": dict(gen.mesh.shape),
      "processes": jax.process_count(),
      "config": config.to_dict(),
  }
  if writer:
    _write_json(storage.join(workdir, "story.json"), report)
  logging.info("story of %d segments, %d frames -> %s (%.1f s)", len(segments),
               result.num_frames, mp4, seconds)
  return report
