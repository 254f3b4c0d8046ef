"""Metric averaging over a log interval; the TensorBoard and JSONL writers, local and gs://."""
import os

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from phenaki_jax import metrics, storage


def test_accumulator_averages_each_key_over_the_steps_that_logged_it():
  acc = metrics.StepAccumulator()
  acc.add("video", {"train/loss": jnp.float32(4.0)})
  acc.add("video", {"train/loss": jnp.float32(2.0)})
  # The GAN turns on mid-interval: its key appears in later steps only.
  acc.add("video", {"train/loss": jnp.float32(3.0), "train/gan/r1": jnp.float32(0.5)})
  acc.add("image", {"train/loss": jnp.float32(7.0), "train/gan/r1": jnp.float32(1.5)})
  out = acc.means(per_kind=("train/loss", "train/gan/r1"))
  assert out["train/loss"] == pytest.approx(4.0)
  assert out["train/gan/r1"] == pytest.approx(1.0)
  assert out["train/video/loss"] == pytest.approx(3.0)
  assert out["train/image/loss"] == pytest.approx(7.0)
  assert out["train/video/gan/r1"] == pytest.approx(0.5)
  assert out["train/video_steps"] == 3 and out["train/image_steps"] == 1
  # The next interval starts empty.
  acc.add("video", {"train/loss": jnp.float32(1.0)})
  assert acc.means() == {"train/loss": 1.0, "train/video_steps": 1.0}


# --- The writers: TensorBoard events and metrics.jsonl, local or in a bucket.

def _tensorboard(logdir):
  """TensorBoard's own reading of a run folder: {plugin: tags} and train/loss by step."""
  from tensorboard.backend.event_processing import plugin_event_multiplexer
  from tensorboard.util import tensor_util
  mux = plugin_event_multiplexer.EventMultiplexer({"run": str(logdir)})
  mux.Reload()
  plugins = {p: sorted(mux.PluginRunToTagToContent(p).get("run", {}))
             for p in ("scalars", "images", "text")}
  losses = {e.step: float(tensor_util.make_ndarray(e.tensor_proto))
            for e in mux.Tensors("run", "train/loss")}
  return plugins, losses


def test_tensorboard_reads_scalars_images_and_texts_across_rotated_event_files(tmp_path):
  writer = metrics.TensorBoardWriter(str(tmp_path), max_file_bytes=600)
  for step in range(1, 6):
    writer.write_scalars(step, {"train/loss": 1.0 / step, "perf/steps_per_sec": np.float32(3)})
  writer.write_images(5, {"eval/reconstructions": np.zeros((1, 6, 8, 3), np.uint8)})
  writer.write_texts(5, {"note": "hello"})
  assert len([f for f in os.listdir(tmp_path) if f.startswith("events.out.tfevents")]) > 1
  plugins, losses = _tensorboard(tmp_path)
  assert plugins == {"scalars": ["perf/steps_per_sec", "train/loss"],
                     "images": ["eval/reconstructions"], "text": ["note"]}
  assert losses == {s: float(np.float32(1.0 / s)) for s in range(1, 6)}


def test_writers_in_a_bucket_keep_what_an_earlier_run_wrote(bucket, tmp_path):
  run = f"{bucket}/run"
  metrics.create_writer(run).write_scalars(1, {"train/loss": 2.0})
  again = metrics.create_writer(run)  # a resumed run: new event file, same metrics.jsonl
  again.write_scalars(2, {"train/loss": 1.0})
  again.write_images(2, {"eval/reconstructions": np.zeros((6, 8, 3), np.uint8)})
  assert metrics.read_jsonl(f"{run}/metrics.jsonl") == [{"step": 1, "train/loss": 2.0},
                                                       {"step": 2, "train/loss": 1.0}]
  events = storage.glob(run, "events.out.tfevents.*")
  assert len(events) == 2
  for remote in events:
    (tmp_path / storage.basename(remote)).write_bytes(storage.read_bytes(remote))
  plugins, losses = _tensorboard(tmp_path)
  assert losses == {1: 2.0, 2: 1.0} and plugins["images"] == ["eval/reconstructions"]
  metrics.save_png(f"{run}/reconstructions/step_0000002.png", np.zeros((6, 8, 3), np.uint8),
                   upscale=2)
  with storage.open_file(f"{run}/reconstructions/step_0000002.png") as f:
    assert Image.open(f).size == (16, 12)
