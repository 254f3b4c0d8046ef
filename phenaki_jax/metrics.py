"""Metric writers (TensorBoard through CLU, plus a JSONL file) and progress lines.

Only process 0 writes. Metric names use slash namespaces: train/loss,
train/vq/usage, eval/psnr, perf/steps_per_sec.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Mapping

import jax
import numpy as np
from absl import logging
from clu import metric_writers
from PIL import Image


class JsonlWriter(metric_writers.MetricWriter):
  """Appends one JSON object per (step, scalars) to metrics.jsonl.

  A plain file that tests and scripts read without TensorBoard.
  """

  def __init__(self, path: str):
    self._path = path
    os.makedirs(os.path.dirname(path), exist_ok=True)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    row = {"step": int(step)}
    row.update({k: float(np.asarray(v)) for k, v in scalars.items()})
    with open(self._path, "a") as f:
      f.write(json.dumps(row) + "\n")

  def write_summaries(self, step, values, metadata=None):
    pass

  def write_images(self, step, images):
    pass

  def write_videos(self, step, videos):
    pass

  def write_audios(self, step, audios, *, sample_rate):
    pass

  def write_texts(self, step, texts):
    pass

  def write_histograms(self, step, arrays, num_buckets=None):
    pass

  def write_hparams(self, hparams):
    pass

  def flush(self):
    pass

  def close(self):
    pass


def create_writer(workdir: str) -> metric_writers.MetricWriter:
  """TensorBoard + log + metrics.jsonl on process 0; nothing elsewhere."""
  if jax.process_index() != 0:
    return metric_writers.MultiWriter([])
  # TensorBoard without CLU's LoggingWriter: the progress and eval lines
  # already show the scalars, once.
  tb = metric_writers.SummaryWriter(workdir)
  return metric_writers.MultiWriter([tb, JsonlWriter(os.path.join(workdir, "metrics.jsonl"))])


def read_jsonl(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


_tree_add = jax.jit(lambda a, b: jax.tree.map(lambda x, y: x + y, a, b))


class StepAccumulator:
  """Sums per-step metrics on device (no host sync per step), by batch kind.

  Steps may log different keys (the GAN's only once it is on): each key is
  averaged over the steps that logged it.
  """

  def __init__(self):
    self._sums: dict[str, dict[str, Any]] = {}
    self._key_counts: dict[str, dict[str, int]] = {}
    self._counts: dict[str, int] = {}

  def add(self, kind: str, step_metrics: Mapping[str, jax.Array]) -> None:
    step_metrics = dict(step_metrics)
    sums = self._sums.setdefault(kind, {})
    counts = self._key_counts.setdefault(kind, {})
    if sums and sums.keys() == step_metrics.keys():
      self._sums[kind] = _tree_add(sums, step_metrics)  # one dispatch, the common case
    else:
      for k, v in step_metrics.items():
        sums[k] = v if k not in sums else sums[k] + v
    for k in step_metrics:
      counts[k] = counts.get(k, 0) + 1
    self._counts[kind] = self._counts.get(kind, 0) + 1

  def means(self, per_kind: tuple[str, ...] = ()) -> dict[str, float]:
    """Means over all steps since the last call; `per_kind` keys also as train/KIND/…."""
    sums = jax.device_get(self._sums)
    keys = sorted({k for s in sums.values() for k in s})
    out = {}
    for k in keys:
      n = sum(c.get(k, 0) for c in self._key_counts.values())
      out[k] = float(sum(np.asarray(s[k]) for s in sums.values() if k in s) / n)
    for kind, s in sums.items():
      for k in per_kind:
        if k in s:
          out[k.replace("train/", f"train/{kind}/", 1)] = float(s[k]) / self._key_counts[kind][k]
      out[f"train/{kind}_steps"] = float(self._counts[kind])
    self._sums, self._key_counts, self._counts = {}, {}, {}
    return out


class ProgressLogger:
  """Logs 'step a/b loss … steps/s … ETA …' at a fixed step interval."""

  def __init__(self, total_steps: int, start_step: int):
    self.total_steps = total_steps
    self._last_step = start_step
    self._last_time = time.perf_counter()

  def steps_per_sec(self, step: int) -> float:
    now = time.perf_counter()
    rate = (step - self._last_step) / max(now - self._last_time, 1e-9)
    self._last_step, self._last_time = step, now
    return rate

  def log(self, step: int, scalars: Mapping[str, float], rate: float) -> None:
    eta_s = (self.total_steps - step) / rate if rate > 0 else float("inf")
    shown = " ".join(f"{k.split('/', 1)[-1]}={v:.4g}" for k, v in scalars.items()
                     if k in ("train/loss", "train/l2", "train/vq/usage", "train/masked_accuracy"))
    logging.info("step %d/%d %s | %.2f steps/s | ETA %s", step, self.total_steps, shown, rate,
                 format_duration(eta_s))


def format_duration(seconds: float) -> str:
  if not np.isfinite(seconds):
    return "?"
  seconds = int(seconds)
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def to_uint8(video: np.ndarray) -> np.ndarray:
  """[-1, 1] floats -> uint8."""
  return np.clip(np.round((np.asarray(video, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def reconstruction_grid(inputs: np.ndarray, recons: np.ndarray) -> np.ndarray:
  """Rows alternate input / reconstruction per example; columns are frames.

  inputs, recons: (N, T, H, W, C) in [-1, 1]. Returns uint8 (H·2N + gaps, W·T + gaps, C).
  """
  n, t, h, w, c = inputs.shape
  gap = 2
  grid = np.full((2 * n * (h + gap) - gap, t * (w + gap) - gap, c), 255, np.uint8)
  for i in range(n):
    for row, clip in enumerate((to_uint8(inputs[i]), to_uint8(recons[i]))):
      y = (2 * i + row) * (h + gap)
      for f in range(t):
        grid[y:y + h, f * (w + gap):f * (w + gap) + w] = clip[f]
  return grid


def save_png(path: str, image: np.ndarray, upscale: int = 1) -> None:
  img = Image.fromarray(image)
  if upscale > 1:
    img = img.resize((img.width * upscale, img.height * upscale), Image.NEAREST)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  img.save(path)
