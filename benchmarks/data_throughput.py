"""Data-path throughput: prepare, loader, and loader vs the tokenizer's train step.

  python benchmarks/data_throughput.py --manifest=../shared/data/real/manifest.jsonl

Prints, on this machine:
  * prepare throughput: seconds of input video per wall second, per worker process;
  * loader throughput: decoded frames/s through the grain pipeline with N worker
    processes (0 = in the trainer process);
  * whether the loader keeps ahead of the tokenizer: loader seconds per batch vs
    train-step seconds per batch at the default config (configs/cvivit.py).
Not a test: figures go to benchmarks/RESULTS.md with the command, machine and date.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_MANIFEST = flags.DEFINE_string("manifest", "../shared/data/real/manifest.jsonl",
                                "JSONL manifest of real clips and images.")
_WORKERS = flags.DEFINE_list("workers", ["0", "1", "2"], "grain worker counts to try.")
_BATCHES = flags.DEFINE_integer("batches", 40, "Batches timed per loader setting.")
_STEPS = flags.DEFINE_integer("steps", 10, "Train steps timed (after 2 warm-up).")


def _video_seconds(manifest: str) -> float:
  from phenaki_jax.data import prepare, video_io
  total = 0.0
  for entry in prepare.iter_manifest(manifest):
    if video_io.is_image_path(entry.path):
      continue
    try:
      total += video_io.probe_video(entry.path).duration
    except Exception:  # pylint: disable=broad-except
      pass
  return total


def bench_prepare(out_dir: str) -> dict:
  from phenaki_jax.data import prepare
  config = prepare.default_config()
  config.update(dict(manifest=os.path.abspath(_MANIFEST.value), resolution=64, num_frames=11,
                     num_workers=1, progress=False))
  start = time.perf_counter()
  summary = prepare.run(config, out_dir)
  wall = time.perf_counter() - start
  seconds = _video_seconds(config.manifest)
  return {"prepare_wall_s": round(wall, 2), "input_video_s": round(seconds, 1),
          "video_s_per_wall_s_per_worker": round(seconds / wall, 2),
          "clips_written": summary["clips_written"]}


def bench_loader(prepared: str, config) -> dict:
  from phenaki_jax.data import pipeline
  out = {}
  for workers in (int(w) for w in _WORKERS.value):
    cfg = config.input.copy_and_resolve_references()
    cfg.num_workers = workers
    it = iter(pipeline.make_train_dataset(cfg, seed=0))
    next(it)  # start-up (worker spawn) is not throughput
    frames, start = 0, time.perf_counter()
    for _ in range(_BATCHES.value):
      batch = next(it)["frames"]
      frames += batch.shape[0] * batch.shape[1]
    wall = time.perf_counter() - start
    out[f"workers={workers}"] = {"frames_per_s": round(frames / wall, 1),
                                 "s_per_batch": round(wall / _BATCHES.value, 4)}
  return out


def bench_step(config) -> float:
  import jax
  from phenaki_jax import optimizers, sharding
  from phenaki_jax.data import pipeline
  from phenaki_jax.train import train_cvivit
  from phenaki_jax.train import cvivit_objective  # pylint: disable=g-import-not-at-top
  from phenaki_jax import train_state  # pylint: disable=g-import-not-at-top
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  with sharding.use_mesh(mesh, config.logical_axis_rules):
    model = train_state.build_cvivit(config)
    tx = optimizers.make_optimizer(config.optimizer, config.total_steps)
    _, shardings, init = train_state.cvivit_abstract_state(config, model, tx, mesh)
    state = jax.jit(init, out_shardings=shardings)(jax.random.key(0))
    step = jax.jit(train_cvivit.make_train_step(model, tx, config), donate_argnums=(0,))
    frozen = cvivit_objective.load_frozen_networks(config)
    cfg = config.input.copy_and_resolve_references()
    cfg.video_ratio = 1.0  # time the (slower) video step
    it = iter(pipeline.make_train_dataset(cfg, seed=0))
    times = []
    for i in range(_STEPS.value + 2):
      batch = next(it)
      start = time.perf_counter()
      state, metrics, _ = step(state, batch, frozen)
      jax.block_until_ready(metrics)
      if i >= 2:
        times.append(time.perf_counter() - start)
  return statistics.median(times)


def main(_):
  from phenaki_jax.config import schema
  sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
  from tests.helpers import load_config  # pylint: disable=g-import-not-at-top
  with tempfile.TemporaryDirectory() as tmp:
    prep = bench_prepare(tmp)
    config = schema.complete(load_config("cvivit", ""))
    config.input.data = "shards"
    config.input.video_shards = tmp
    config.input.image_shards = tmp
    loader = bench_loader(tmp, config)
    step_s = bench_step(config)
  report = {"prepare": prep, "loader": loader, "train_step_s_default_config": round(step_s, 4),
            "loader_keeps_ahead": {k: v["s_per_batch"] < step_s for k, v in loader.items()},
            "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d")}
  print(json.dumps(report, indent=2))


if __name__ == "__main__":
  app.run(main)
