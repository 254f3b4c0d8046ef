"""Frame prediction (configs/eval.py:frame_prediction), job 'eval_prediction'.

  python -m phenaki_jax.main --config=configs/eval.py:frame_prediction --workdir=runs/fp \
      --config.generator.workdir=runs/maskgit
  python -m phenaki_jax.main --config=configs/eval.py:frame_prediction,kinetics ...

The paper's frame-prediction benchmarks: each held-out clip's first N frames
(protocol.context_frames) are given to the generator (Generator.continue_from,
through the tokenizer's causal encoder, as a story's context), which predicts
the next M (protocol.predict_frames) under the clip's caption (protocol.text).
The presets are BAIR-style (64×64, 1 → 15) and Kinetics-style (64×64, 5 → 11).

Reported, for samples_per_clip predictions of each of num_clips clips:
  fvd            whole clips, the N given frames and the M predicted ones, against
                 the real N + M: what published BAIR and Kinetics-600 figures (the
                 paper's among them) measure;
  fvd_predicted  the M predicted frames alone against the real M;
  psnr, ssim, lpips of the predicted frames against the real ones (means over
                 frames, clips and samples), psnr_per_frame (by predicted frame);
  last_frame_psnr, last_frame_ssim: the same for repeating the last given frame,
                 the floor a prediction has to clear.
The protocol (N, M, resolution, fps, clips, samples, sampling options, seeds,
and which preset values were changed) goes into the report beside them.

A protocol longer than one generator window is refused, naming both frame
counts, unless protocol.rollout predicts window after window. Writes
WORKDIR/frame_prediction_PRESET_step_N.json and .png (rows: real, predicted).
"""
from __future__ import annotations

import datetime
import functools
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from phenaki_jax import distributed, metrics, storage
from phenaki_jax import placement as placement_lib
from phenaki_jax.config import protocol as protocol_lib
from phenaki_jax.config import schema
from phenaki_jax.config.schema import ConfigError
from phenaki_jax.data import pipeline, video_io
from phenaki_jax.eval import fvd as fvd_lib
from phenaki_jax.eval import recon
from phenaki_jax.eval import report as report_lib
from phenaki_jax.eval.video_sets import FolderSet
from phenaki_jax.generator import Generator, SamplingOptions
from phenaki_jax.pretrained import perceptual
from phenaki_jax.sampling import continuation

FVD_REPORTED = (
    "fvd: the whole clips (the given frames and the predicted ones, against the real clips), "
    "as the published BAIR and Kinetics-600 frame-prediction figures, the paper's among them, "
    "are computed; fvd_predicted: the predicted frames alone, against the real frames they "
    "stand for")


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  start_time = time.perf_counter()
  config = schema.complete(config)
  schema.validate_eval_prediction(config)
  p = config.protocol
  options = SamplingOptions.from_config(config.sampling)
  n_ctx, n_pred = int(p.context_frames), int(p.predict_frames)
  total = n_ctx + n_pred

  # Every process holds a part of each batch (placement.default_mesh).
  mesh = placement_lib.default_mesh(config.batch_size, "batch_size")
  gen = load_generator(config, mesh)
  plan = check_geometry(config, gen)
  clips, captions, source = read_clips(config, gen)
  check_metric_sizes(config)
  logging.info("frame prediction (%s preset): %d clips, %d -> %d frames at %dpx, %d window(s) "
               "each, %d sample(s) per clip; clips %s", p.preset, len(clips), n_ctx, n_pred,
               p.resolution, len(plan), p.samples_per_clip, source["clips"])

  scores = PredictionScores(config, total)
  t0 = time.perf_counter()
  grid_real, grid_pred = [], []
  bs, num, samples = config.batch_size, len(clips), p.samples_per_clip
  prompts_all = captions if p.text == "caption" else [""] * num
  for s in range(samples):
    for first in range(0, num, bs):
      real = clips[first:first + bs]
      n = len(real)
      prompts = prompts_all[first:first + bs]
      if n < bs:  # one compilation: the last batch is padded with its last clip
        real = np.concatenate([real, np.repeat(real[-1:], bs - n, axis=0)])
        prompts = prompts + [prompts[-1]] * (bs - n)
      video = continuation.continue_video(
          gen, prompts, real[:, :n_ctx], total, seed=p.seed + s * num + first,
          seed_stride=samples * num, options=options, context_frames=p.rollout_context_frames)
      scores.add(real, video, n, with_real=(s == 0))
      if s == 0 and len(grid_real) < config.num_grid_clips:
        grid_real.extend(real[:n]), grid_pred.extend(video[:n])
  sampling_seconds = time.perf_counter() - t0

  result, warnings = scores.result(num, samples)
  if not source["held_out"]:
    warnings.append(f"the clips are training clips ({source['clips']}): the scores measure "
                    "memory as much as prediction")
  changed = protocol_lib.prediction_changes(p)
  if changed:
    warnings.append(f"protocol values changed from the {p.preset!r} preset: " + ", ".join(
        f"{k} {a} -> {b}" for k, (a, b) in changed.items()))
  warnings.append(f"published {p.preset} figures use {protocol_lib.PUBLISHED_COUNTS[p.preset]}; "
                  f"this run: {num} clips, {samples} sample(s) each")
  if len(plan) > 1:
    warnings.append(f"predicted in {len(plan)} windows (protocol.rollout): the generator's "
                    f"window is {gen.num_frames} frames, the protocol's {total}")
  for w in warnings:
    logging.warning("%s", w)

  report = {
      "job": "eval_prediction",
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "generator": {"workdir": storage.absolute(config.generator.workdir), "step": gen.step,
                    "weights": "ema" if config.generator.use_ema else "raw",
                    "window_frames": gen.num_frames,
                    "trained_to_continue": gen.trained_to_continue,
                    "tokenizer": {"workdir": storage.absolute(gen.tokenizer_workdir),
                                  "step": gen.tokenizer.step}},
      "metrics": result,
      "protocol": {**p.to_dict(), "resolved": describe(config, plan, scores, source, changed)},
      "clips": source,
      "warnings": warnings,
      "seconds": {"predict_and_score": round(sampling_seconds, 3),
                  "total": round(time.perf_counter() - start_time, 3)},
      "device": f"{jax.devices()[0].platform} ({jax.devices()[0].device_kind}) x "
                f"{mesh.devices.size}",
      "config": config.to_dict(),
  }
  stem = storage.join(workdir, f"frame_prediction_{p.preset}_step_{gen.step}")
  png_path = None
  if jax.process_index() == 0:
    storage.makedirs(workdir)
    report_lib.write_json(stem + ".json", report)
    if grid_real:
      k = config.num_grid_clips
      grid = metrics.reconstruction_grid(np.stack(grid_real[:k]) / 127.5 - 1.0,
                                         np.stack(grid_pred[:k]) / 127.5 - 1.0)
      png_path = stem + ".png"
      metrics.save_png(png_path, grid, upscale=max(1, 128 // int(p.resolution)))
  shown = ("fvd", "fvd_predicted", "psnr", "ssim", "lpips", "last_frame_psnr")
  logging.info("frame prediction %s: %s (%.0f s) -> %s.json", p.preset,
               " ".join(f"{k}={result[k]:.4g}" for k in shown if k in result),
               report["seconds"]["total"], stem)
  return {**report, "json_path": stem + ".json", "png_path": png_path}


# --- The generator, and whether the protocol fits it.

def load_generator(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> Generator:
  g = config.generator
  try:
    return Generator.load(g.workdir, step=None if g.step < 0 else g.step, use_ema=g.use_ema,
                          tokenizer_workdir=g.tokenizer_workdir or None, mesh=mesh)
  except FileNotFoundError as e:
    raise ConfigError(f"config.generator.workdir={g.workdir!r} / generator.step: {e}") from None


def check_geometry(config: ml_collections.ConfigDict, gen: Generator) -> list[tuple[int, int]]:
  """The windows (context, new frames) the protocol takes on `gen`; a protocol that
  does not fit is refused naming the key and the generator's numbers."""
  p = config.protocol
  total = p.context_frames + p.predict_frames
  tok = f"its tokenizer ({gen.tokenizer_workdir}, step {gen.tokenizer.step})"
  side = int(gen.tokenizer.config.input.resolution)
  if p.resolution != side:
    raise ConfigError(f"config.protocol.resolution={p.resolution}: the generator's frames are "
                      f"{side}x{side} ({tok} runs only at that size); evaluate at {side}, or "
                      f"train a generator at {p.resolution}")
  if p.context_frames not in gen.start_lengths():
    raise ConfigError(f"config.protocol.context_frames={p.context_frames}: this generator "
                      f"continues from one of {gen.start_lengths()} frames (1 + j·temporal "
                      f"patch, shorter than its {gen.num_frames}-frame window)")
  if total > gen.num_frames and not p.rollout:
    tp = int(gen.tokenizer.config.model.temporal_patch_size)
    need = 1 + tp * -(-(total - 1) // tp)
    raise ConfigError(
        f"config.protocol.predict_frames={p.predict_frames}: the protocol takes "
        f"{p.context_frames} + {p.predict_frames} = {total} frames, but {tok} makes "
        f"{gen.num_frames}-frame clips; use a generator whose tokenizer trained on >= {need} "
        "frames, or set protocol.rollout=True to predict window after window")
  try:
    return continuation.window_plan(gen, p.context_frames, total, p.rollout_context_frames)
  except ValueError as e:
    raise ConfigError(f"config.protocol.rollout_context_frames: {e}") from None


def check_metric_sizes(config: ml_collections.ConfigDict) -> None:
  p = config.protocol
  if p.resolution < recon.SSIM_WINDOW:
    raise ConfigError(f"config.protocol.resolution={p.resolution}: SSIM needs frames of at "
                      f"least {recon.SSIM_WINDOW}x{recon.SSIM_WINDOW}")
  need = recon.LPIPS_MIN_RESOLUTION[p.lpips_net]
  if p.lpips and p.resolution < need:
    raise ConfigError(f"config.protocol.lpips_net={p.lpips_net!r} needs frames of at least "
                      f"{need}x{need}; the protocol's are {p.resolution} ('vgg16' works from "
                      "16x16; or set protocol.lpips=False)")


# --- The clips.

def clip_input(config: ml_collections.ConfigDict, gen: Generator
               ) -> tuple[ml_collections.ConfigDict, ml_collections.ConfigDict]:
  """(the input config the clips are read with, the one the generator trained on)."""
  trained = gen.config.input
  if trained.data == "tokens":  # codes only: the pixels are the tokenizer's data
    trained = gen.tokenizer.config.input
  cfg = ml_collections.ConfigDict(trained.to_dict())
  for key, value in config.input.items():
    if value:
      cfg[key] = value
  p = config.protocol
  cfg.num_frames, cfg.resolution, cfg.video_ratio = (p.context_frames + p.predict_frames,
                                                     p.resolution, 1.0)
  return cfg, trained


def read_clips(config: ml_collections.ConfigDict, gen: Generator
               ) -> tuple[np.ndarray, list[str], dict[str, Any]]:
  """(uint8 clips (N, context + predicted, r, r, 3), captions, where they came from)."""
  p = config.protocol
  total = p.context_frames + p.predict_frames
  if config.folder:
    return read_folder(config, total)
  cfg, trained = clip_input(config, gen)
  description, held_out = pipeline.eval_source(cfg, trained=trained)
  try:
    clips, captions = pipeline.eval_clips(cfg, seed=int(gen.config.get("seed", 0)),
                                          count=p.num_clips, key="config.protocol.num_clips",
                                          trained=trained)
  except ValueError as e:
    if isinstance(e, ConfigError) or "num_clips" in str(e):
      raise ConfigError(str(e)) from None
    raise ConfigError(f"the clips cannot serve a {p.context_frames} + {p.predict_frames}-frame "
                      f"protocol at {p.resolution}px (config.protocol.context_frames, "
                      f"predict_frames, resolution): {e}") from None
  return clips, captions, {"data": cfg.data, "clips": description, "held_out": held_out,
                           "selection": "pipeline.eval_clips: the first num_clips of an "
                                        "endless source, else num_clips spread evenly"}


def read_folder(config: ml_collections.ConfigDict, total: int
                ) -> tuple[np.ndarray, list[str], dict[str, Any]]:
  p = config.protocol
  videos = FolderSet(config.folder, key="folder", protocol_seed=p.seed, fps=p.fps,
                     captions_path=config.captions)
  clips, captions = [], []
  for item in videos:
    if len(item.video) < total:
      videos.skip(item.name, video_io.TOO_SHORT,
                  f"{len(item.video)} frames, fewer than the protocol's {total}")
      continue
    r = p.resolution
    clips.append(np.stack([video_io.resize_and_crop(f, (r, r)) for f in item.video[:total]]))
    captions.append(item.caption or "")
    if len(clips) == p.num_clips:
      break
  if len(clips) < p.num_clips:
    raise ConfigError(f"config.protocol.num_clips={p.num_clips}: the folder {config.folder} "
                      f"gave {len(clips)} clip(s) of {total} frames"
                      f"{' (' + str(len(videos.skipped)) + ' file(s) skipped)' if videos.skipped else ''}")
  return np.stack(clips), captions, {
      **videos.describe(), "data": "folder", "held_out": True, "skipped": videos.skipped,
      "clips": f"held out: the videos of {config.folder} (each one's first {total} frames)",
      "selection": f"files in an order shuffled with protocol.seed={p.seed}"}


# --- The scores.

class PredictionScores:
  """Per-batch metrics and I3D statistics, summed over batches and samples."""

  def __init__(self, config: ml_collections.ConfigDict, total: int):
    p = config.protocol
    self.n_ctx, self.total = int(p.context_frames), total
    self.batch_size = int(config.batch_size)
    self.placement = placement_lib.Placement(
        placement_lib.default_mesh(self.batch_size, "batch_size"))
    pl = self.placement
    self.lpips_net = p.lpips_net if p.lpips else None
    self._lpips_params = (pl.put_replicated(perceptual.lpips_params(self.lpips_net))
                          if self.lpips_net else None)
    self._metrics = distributed.CompiledTogether(jax.jit(functools.partial(
        recon.clip_metrics, lpips_net=self.lpips_net,
        lpips_frames=tuple(range(total - self.n_ctx))),
        in_shardings=(pl.replicated, pl.batch, pl.batch), out_shardings=pl.replicated),
        "prediction_metrics")
    self.i3d_whole = self.i3d_predicted = None
    if p.fvd:
      # One copy of the weights for both clip lengths (each compiles apart).
      kw = dict(resolution=p.fvd_resolution, batch_size=self.batch_size, placement=pl,
                batch_key="batch_size", variables=perceptual.i3d_variables())
      self.i3d_whole = fvd_lib.I3DFeatureExtractor(num_frames=total,
                                                   frames_key="protocol.context_frames", **kw)
      self.i3d_predicted = fvd_lib.I3DFeatureExtractor(
          num_frames=total - self.n_ctx, frames_key="protocol.predict_frames", **kw)
    self.stats = {k: fvd_lib.FeatureStats(dim=400) for k in
                  ("whole", "predicted", "real_whole", "real_predicted")}
    self.sums: dict[str, float] = {}
    self.per_frame = np.zeros((total - self.n_ctx,), np.float64)
    self.baseline: dict[str, float] = {}

  def _scores(self, real: np.ndarray, frames: np.ndarray) -> dict[str, np.ndarray]:
    pl = self.placement
    with jax.set_mesh(pl.mesh):
      out = self._metrics(self._lpips_params, pl.put_batch(real),
                          pl.put_batch(frames.astype(np.float32) / 127.5 - 1.0))
    return {k: placement_lib.to_host(v).astype(np.float64) for k, v in out.items()}

  def _add(self, into: dict[str, float], scores: dict[str, np.ndarray], n: int) -> None:
    for k, v in scores.items():
      into[k] = into.get(k, 0.0) + float(v[:n].sum())

  def add(self, real: np.ndarray, video: np.ndarray, n: int, *, with_real: bool) -> None:
    """A padded batch: real clips and predicted videos (B, total, ...), n of them real."""
    truth, predicted = real[:, self.n_ctx:], video[:, self.n_ctx:]
    self._add(self.sums, self._scores(truth, predicted), n)
    err = np.square(truth[:n].astype(np.float64) / 255 - predicted[:n].astype(np.float64) / 255)
    mse = err.reshape(n, err.shape[1], -1).mean(-1)
    self.per_frame += (10 * np.log10(1.0 / np.maximum(mse, 1e-10))).sum(0)
    if with_real:
      still = np.repeat(real[:, self.n_ctx - 1:self.n_ctx], truth.shape[1], axis=1)
      self._add(self.baseline, self._scores(truth, still), n)
      if self.i3d_whole is not None:
        self.stats["real_whole"].update(self.i3d_whole(real[:n]))
        self.stats["real_predicted"].update(self.i3d_predicted(truth[:n]))
    if self.i3d_whole is not None:
      self.stats["whole"].update(self.i3d_whole(video[:n]))
      self.stats["predicted"].update(self.i3d_predicted(predicted[:n]))

  def result(self, num_clips: int, samples: int) -> tuple[dict[str, Any], list[str]]:
    count = num_clips * samples
    out: dict[str, Any] = {k: v / count for k, v in self.sums.items()}
    out["psnr_per_frame"] = [round(float(x), 4) for x in self.per_frame / count]
    out.update({f"last_frame_{k}": v / num_clips for k, v in self.baseline.items()})
    warnings = []
    if self.i3d_whole is not None:
      if num_clips < 2:
        raise ConfigError(f"config.protocol.num_clips={num_clips}: FVD needs at least 2 clips")
      out["fvd"] = self.stats["whole"].frechet_distance(self.stats["real_whole"])
      out["fvd_predicted"] = self.stats["predicted"].frechet_distance(
          self.stats["real_predicted"])
      out["fvd_clips"] = {"predicted": count, "real": num_clips}
      if num_clips < fvd_lib.FVD_MIN_CLIPS:
        warnings.append(f"FVD from {num_clips} real clips (< {fvd_lib.FVD_MIN_CLIPS}): "
                        + fvd_lib.FVD_FEW_CLIPS_WHY)
    else:
      warnings.append("FVD not computed (protocol.fvd=False)")
    return out, warnings


def describe(config: ml_collections.ConfigDict, plan: list[tuple[int, int]],
             scores: PredictionScores, source: dict[str, Any],
             changed: dict[str, Any]) -> dict[str, Any]:
  """The protocol in words, for the report."""
  p = config.protocol
  n, m = p.context_frames, p.predict_frames
  out = {
      "frames": (f"the first {n} frame(s) of each clip are given, the next {m} predicted "
                 f"({n + m} in all), at {p.resolution}x{p.resolution}; "
                 + (f"folder videos resampled to {p.fps:g} fps" if p.fps else
                    "frames as stored")),
      "windows": [{"context_frames": k, "new_frames": new} for k, new in plan],
      "text": ("each clip's caption (empty where the data has none)" if p.text == "caption"
               else "none: every prediction is unconditioned on text"),
      "sampling": dict(SamplingOptions.from_config(config.sampling).__dict__),
      "seeds": (f"sample s of clip i, window w draws from protocol.seed + (w·"
                f"{p.samples_per_clip} + s)·num_clips + i (seed {p.seed})"),
      "fvd_reported": FVD_REPORTED,
      "psnr_ssim_lpips": ("of the predicted frames against the real ones: PSNR per clip over "
                          "all its predicted frames and pixels (data range [0, 1]), SSIM "
                          f"({recon.SSIM_WINDOW}x{recon.SSIM_WINDOW} Gaussian window, sigma "
                          f"{recon.SSIM_SIGMA}) and LPIPS ({scores.lpips_net or 'off'}) per "
                          "frame; means over frames, clips and samples"),
      "last_frame": "the same scores for repeating the last given frame (no prediction)",
      "preset": {"name": p.preset, "values": protocol_lib.PREDICTION_PRESETS[p.preset],
                 "changed": {k: {"preset": a, "here": b} for k, (a, b) in changed.items()},
                 "published_counts": protocol_lib.PUBLISHED_COUNTS[p.preset]},
      "source": source["clips"],
  }
  if scores.i3d_whole is not None:
    out["i3d"] = {**scores.i3d_whole.protocol(), "fvd_num_frames": {
        "fvd": n + m, "fvd_predicted": m}}
  return out
