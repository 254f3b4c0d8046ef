"""Metric writers (TensorBoard event files, plus a JSONL file) and progress lines.

Only process 0 writes. Metric names use slash namespaces: train/loss,
train/vq/usage, eval/psnr, perf/steps_per_sec.

Both files go through storage.py, so a workdir may be local or gs://. The
TensorBoard events are written by our own small writer (tensorboard's protos
and record framing, no TensorFlow): CLU's SummaryWriter writes through
TensorFlow's GCS client, which has no endpoint setting (no emulator can test
it) and, offline, retries www.googleapis.com for minutes.
"""
from __future__ import annotations

import io
import itertools
import json
import os
import socket
import time
from typing import Any, Mapping

import jax
import numpy as np
from absl import logging
from clu import metric_writers
from PIL import Image

from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.plugins.image import metadata as image_metadata
from tensorboard.plugins.scalar import summary_v2 as scalar_summary
from tensorboard.plugins.text import summary_v2 as text_summary
from tensorboard.summary.writer import record_writer
from tensorboard.util import tensor_util

from phenaki_jax import storage


class JsonlWriter(metric_writers.MetricWriter):
  """Appends one JSON object per (step, scalars) to metrics.jsonl.

  A plain file that tests and scripts read without TensorBoard. A resumed run
  appends after what the earlier runs wrote (on object storage the object is
  read back and rewritten whole, storage.AppendOnlyText): a step redone after
  a kill appears twice, the later row is the one that counts.
  """

  def __init__(self, path: str):
    self._file = storage.AppendOnlyText(path)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    row = {"step": int(step)}
    row.update({k: float(np.asarray(v)) for k, v in scalars.items()})
    self._file.append(json.dumps(row) + "\n")

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


_EVENT_FILE_IDS = itertools.count()


class TensorBoardWriter(metric_writers.MetricWriter):
  """Scalars, images and texts as a TensorBoard event file in `logdir`, local or gs://.

  The summaries TensorFlow's tf.summary.scalar / image / text make (the
  scalars, images and text plugins' tensors), framed as TFRecords. Each
  write_* call appends its events at once (one whole-object rewrite on object
  storage, storage.AppendOnlyBytes); past `max_file_bytes` the writer starts a
  new event file, so a rewrite never grows without bound (TensorBoard reads
  every event file of a folder).
  """

  def __init__(self, logdir: str, max_file_bytes: int = 4 << 20):
    self._logdir = logdir
    self._max_file_bytes = max_file_bytes
    self._file = None
    self._open_file()

  def _open_file(self) -> None:
    # Unique also for two writers of one process within a second (a resumed run in-process).
    name = (f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}."
            f"{os.getpid()}.{next(_EVENT_FILE_IDS)}.v2")
    self._file = storage.AppendOnlyBytes(storage.join(self._logdir, name))
    self._append([event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2")])

  def _append(self, events) -> None:
    sink = _BytesSink()
    records = record_writer.RecordWriter(sink)
    for event in events:
      records.write(event.SerializeToString())
    self._file.append(sink.getvalue())

  def _write(self, step: int, values) -> None:
    if self._file.size >= self._max_file_bytes:
      self._open_file()
    now = time.time()
    self._append([event_pb2.Event(wall_time=now, step=int(step),
                                  summary=summary_pb2.Summary(value=[v])) for v in values])

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    self._write(step, [scalar_summary.scalar_pb(k, np.asarray(v, np.float32)).value[0]
                       for k, v in scalars.items()])

  def write_images(self, step: int, images: Mapping[str, Any]) -> None:
    """Each value: uint8 (N, H, W, C) or (H, W, C), C in 1, 3, 4."""
    values = []
    for key, batch in images.items():
      batch = np.asarray(batch)
      if batch.ndim == 3:
        batch = batch[None]
      pngs = [_png_bytes(image) for image in batch]
      tensor = tensor_util.make_tensor_proto(
          [str(batch.shape[2]).encode(), str(batch.shape[1]).encode(), *pngs])
      values.append(summary_pb2.Summary.Value(
          tag=key, tensor=tensor,
          metadata=image_metadata.create_summary_metadata(display_name=None, description="")))
    self._write(step, values)

  def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
    self._write(step, [text_summary.text_pb(k, v).value[0] for k, v in texts.items()])

  def _unsupported(self, what: str):
    raise NotImplementedError(f"TensorBoardWriter writes scalars, images and texts, not {what}")

  def write_summaries(self, step, values, metadata=None):
    self._unsupported("raw summaries")

  def write_videos(self, step, videos):
    self._unsupported("videos")

  def write_audios(self, step, audios, *, sample_rate):
    self._unsupported("audio")

  def write_histograms(self, step, arrays, num_buckets=None):
    self._unsupported("histograms")

  def write_hparams(self, hparams):
    self._unsupported("hparams")

  def flush(self):
    pass  # every write_* call has already reached the file

  def close(self):
    pass


class _BytesSink(io.BytesIO):
  """RecordWriter's file: the framed records are collected, then appended whole."""

  def close(self):
    pass


def _png_bytes(image: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(np.asarray(image).squeeze(-1) if np.shape(image)[-1] == 1 else image).save(
      buf, format="PNG")
  return buf.getvalue()


def create_writer(workdir: str) -> metric_writers.MetricWriter:
  """TensorBoard events + metrics.jsonl in `workdir` on process 0; nothing elsewhere."""
  if jax.process_index() != 0:
    return metric_writers.MultiWriter([])
  # No CLU LoggingWriter: the progress and eval lines already show the scalars, once.
  return metric_writers.MultiWriter([TensorBoardWriter(workdir),
                                     JsonlWriter(storage.join(workdir, "metrics.jsonl"))])


def read_jsonl(path: str) -> list[dict]:
  return [json.loads(line) for line in storage.read_text(path).splitlines() if line.strip()]


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
  buf = io.BytesIO()
  img.save(buf, format=storage.splitext(path)[1].lstrip(".").upper() or "PNG")
  storage.write_bytes(path, buf.getvalue())
