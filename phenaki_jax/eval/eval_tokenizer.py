"""The tokenizer evaluation job (configs/eval.py:tokenizer), job 'eval_tokenizer'.

'eval_tokenizer': a C-ViViT checkpoint on held-out clips. Writes
WORKDIR/tokenizer_eval_step_N.json (metrics, the protocol they were measured
under, the checkpoint, the date) and WORKDIR/tokenizer_eval_step_N.png (odd
rows inputs, even rows reconstructions), and logs a one-line summary.
"""
from __future__ import annotations

import datetime
import json
import time
from typing import Any

import jax
import ml_collections
from absl import logging

from phenaki_jax import metrics
from phenaki_jax import storage
from phenaki_jax.config import schema
from phenaki_jax.config.schema import ConfigError
from phenaki_jax.data import pipeline
from phenaki_jax import placement as placement_lib
from phenaki_jax.eval import recon
from phenaki_jax import tokenizer as tokenizer_lib

# input.* keys of the eval config that fall back to the tokenizer's training
# value when left at these sentinels.
_INPUT_SENTINELS = {"data": "", "video_shards": "", "tfds_video": "", "tfds_split": "",
                    "tfds_data_dir": "", "tfds_frames_key": "", "num_frames": -1,
                    "resolution": -1}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  job = config.get("job")
  if job == "eval_tokenizer":
    return evaluate_tokenizer(config, workdir)
  raise ConfigError(f"config.job={job!r}: unknown evaluation job; expected 'eval_tokenizer'")


# --- The held-out clips.

def resolve_input(eval_input: ml_collections.ConfigDict,
                  tok_config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The tokenizer's input config with the eval job's non-sentinel keys on top."""
  cfg = ml_collections.ConfigDict(tok_config.input.to_dict())
  for key, sentinel in _INPUT_SENTINELS.items():
    if eval_input[key] != sentinel:
      cfg[key] = eval_input[key]
  cfg.video_ratio = 1.0  # clips only
  tp = tok_config.model.temporal_patch_size
  if cfg.resolution != tok_config.input.resolution:
    raise ConfigError(
        f"config.input.resolution={cfg.resolution}: the tokenizer was trained at "
        f"{tok_config.input.resolution}x{tok_config.input.resolution} and only runs at that "
        "size; evaluate on clips of its resolution (-1 takes it)")
  if (cfg.num_frames - 1) % tp:
    raise ConfigError(f"config.input.num_frames={cfg.num_frames}: the tokenizer takes 1 + k·"
                      f"{tp} frames (model.temporal_patch_size={tp})")
  needs = {"shards": "video_shards", "tfds": "tfds_video"}.get(cfg.data)
  if needs and not cfg[needs]:
    raise ConfigError(f"config.input.{needs} is required when input.data={cfg.data!r}")
  return cfg


def describe_source(input_cfg: ml_collections.ConfigDict, tok_config: ml_collections.ConfigDict,
                    seed: int) -> dict[str, Any]:
  """Where the clips come from, for the report (pipeline.eval_source): `clips` starts
  'held out: ' or 'training clips: ', and `held_out` says which."""
  clips, held_out = pipeline.eval_source(input_cfg, trained=tok_config.input)
  source: dict[str, Any] = {"data": input_cfg.data, "num_frames": int(input_cfg.num_frames),
                            "resolution": int(input_cfg.resolution), "seed": int(seed),
                            "clips": clips, "held_out": held_out,
                            "selection": "pipeline.eval_videos: the first num_clips clips of "
                                         "an endless source, else num_clips spread evenly"}
  if input_cfg.data == "shards":
    source["video_shards"] = input_cfg.video_shards
  elif input_cfg.data == "tfds":
    source.update(tfds_video=input_cfg.tfds_video, tfds_split=input_cfg.tfds_split)
  return source


# --- The job.

def _summary(metrics_: dict[str, float]) -> str:
  shown = ("psnr", "ssim", "lpips", "rfvd", "codebook_usage", "codebook_perplexity",
           "tokens_per_clip")
  return " ".join(f"{k}={metrics_[k]:.4g}" for k in shown if k in metrics_)


def _write_json(path: str, payload: dict[str, Any]) -> None:
  # Whole (storage.write_text): readers never see half a report.
  storage.write_text(path, json.dumps(payload, indent=2, sort_keys=False) + "\n")


def evaluate_tokenizer(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs the tokenizer evaluation; returns the report (plus 'json_path', 'png_path')."""
  start = time.perf_counter()
  config = schema.complete(config)
  schema.validate_eval_tokenizer(config)
  # The evaluation mesh first: a batch it cannot split fails before anything loads.
  mesh = placement_lib.default_mesh(config.protocol.batch_size, "protocol.batch_size")
  # The weights only, straight onto the evaluation mesh (every process of a job loads together).
  tok = tokenizer_lib.load_from_config(config.tokenizer, mesh=mesh)
  logging.info("evaluating tokenizer %s step %d", config.tokenizer.workdir, tok.step)
  input_cfg = resolve_input(config.input, tok.config)
  source = describe_source(input_cfg, tok.config, config.seed)
  logging.info("evaluation clips: %s", source["clips"])
  clips = pipeline.eval_videos(input_cfg, seed=config.seed, count=config.protocol.num_clips,
                               key="config.protocol.num_clips", trained=tok.config.input)
  evaluator = recon.ReconstructionEvaluator(
      clips, config.protocol, codebook_size=tok.config.model.codebook_size, source=source,
      mesh=mesh)
  result = evaluator(tok.reconstruct_with_codes)

  tokenizer_info = {"workdir": storage.absolute(config.tokenizer.workdir), "step": int(tok.step),
                    "weights": "ema" if config.tokenizer.use_ema else "raw",
                    "codebook_size": int(tok.config.model.codebook_size),
                    "token_grid": list(result.token_grid)}
  seconds = {k: round(v, 3) for k, v in result.seconds.items()}
  seconds["total"] = round(time.perf_counter() - start, 3)
  report = {
      "job": "eval_tokenizer",
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "tokenizer": tokenizer_info,
      "metrics": result.metrics,
      "protocol": result.protocol,
      "seconds": seconds,
      "device": f"{jax.devices()[0].platform} ({jax.devices()[0].device_kind}) x "
                f"{evaluator.placement.num_devices}",
      "config": config.to_dict(),
  }
  stem = storage.join(workdir, f"tokenizer_eval_step_{tok.step}")
  png_path = None
  if jax.process_index() == 0:
    storage.makedirs(workdir)
    _write_json(stem + ".json", report)
    n = min(config.num_grid_clips, len(clips))
    if n:
      grid = metrics.reconstruction_grid(clips[:n] / 127.5 - 1.0,
                                         result.reconstructions[:n] / 127.5 - 1.0)
      png_path = stem + ".png"
      metrics.save_png(png_path, grid, upscale=max(1, 128 // input_cfg.resolution))
  logging.info("tokenizer %s step %d on %d %s clips: %s (%.0f s) -> %s.json",
               config.tokenizer.workdir, tok.step, len(clips), input_cfg.data,
               _summary(result.metrics), seconds["total"], stem)
  return {**report, "json_path": stem + ".json", "png_path": png_path}
