"""Every config key a trainer reads, with its default, in one place; and checks.

`configs/*.py` start from these defaults and change values for their variants.
A trainer checks the config it is given against the same defaults, so a key it
does not know (a typo, a stale key) and an impossible value fail at start-up,
before anything compiles, with a message that names the key.
"""
from __future__ import annotations

from typing import Any, Iterable

import jax.numpy as jnp
import ml_collections

from phenaki_jax import sharding


class ConfigError(ValueError):
  """A config key or value the trainer cannot use."""


# Physical placement of the logical axes used by the tokenizer. Batch-like
# activation axes go over data and fsdp; weights are split along 'embed' by
# fsdp and along heads / mlp by tensor.
TOKENIZER_RULES = (
    ("act_batch", ("data", "fsdp")),
    ("act_len", None),
    ("act_frames", None),
    ("act_height", None),
    ("act_width", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv", None),
    ("act_mlp", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("patch", None),
    ("grid", None),
    ("code", None),
    ("codebook", None),
)


def _rules_as_lists(rules: Iterable[tuple[str, Any]]) -> list:
  return [[name, list(axes) if isinstance(axes, tuple) else axes] for name, axes in rules]


def cvivit_defaults() -> ml_collections.ConfigDict:
  """Defaults of the C-ViViT tokenizer trainer (the CPU-friendly default run)."""
  c = ml_collections.ConfigDict()
  c.job = "cvivit"
  c.seed = 0
  c.total_steps = 2500
  c.log_every_steps = 50
  c.checkpoint_every_steps = 500
  c.keep_checkpoints = 3
  c.async_checkpointing = True
  # Steps with a NaN/Inf loss, gradient or update are skipped; this many in a
  # row stop the run with an error (0: never stop).
  c.max_consecutive_nonfinite = 5
  # Reconstruction images + held-out PSNR/usage; 0 disables.
  c.eval_every_steps = 500
  c.num_eval_examples = 8

  c.mesh = ml_collections.ConfigDict()
  c.mesh.shape = (-1, 1, 1)  # (data, fsdp, tensor); one -1 takes the remaining devices.
  c.logical_axis_rules = _rules_as_lists(TOKENIZER_RULES)

  c.input = ml_collections.ConfigDict()
  # 'shapes' (built in), 'shards' (ArrayRecord from configs/prepare.py) or
  # 'tfds' (a TFDS dataset prepared in ArrayRecord format).
  c.input.data = "shapes"
  c.input.video_shards = ""  # a prepare output dir, a shard dir, a glob, or a comma list
  c.input.image_shards = ""
  c.input.tfds_video = ""  # TFDS name ('name/config:version') or prepared folder
  c.input.tfds_image = ""
  c.input.tfds_split = "train"
  c.input.tfds_data_dir = ""
  c.input.tfds_frames_key = "video"  # for image datasets e.g. 'image'
  c.input.tfds_caption_key = "caption"
  # Augmentation, the same for every frame of a clip. Off for the built-in
  # shapes, whose captions name directions (a flip would contradict them).
  c.input.random_crop_min_scale = 1.0  # crop side ~ U(min, 1)·side, resized back; 1 = off
  c.input.horizontal_flip = False
  c.input.batch_size = 8  # global, per step
  c.input.num_frames = 11
  c.input.resolution = 64
  c.input.video_ratio = 0.8  # fraction of steps (= of examples) that are video clips
  c.input.num_workers = 0  # grain worker processes; 0 reads in the trainer process
  c.input.prefetch = 2

  c.model = ml_collections.ConfigDict()
  c.model.patch_size = 8
  c.model.temporal_patch_size = 2
  c.model.width = 128
  c.model.num_heads = 4
  c.model.head_dim = 32
  c.model.mlp_dim = 512
  c.model.spatial_depth = 2
  c.model.temporal_depth = 2
  c.model.codebook_size = 1024
  c.model.code_dim = 32
  c.model.remat = False
  c.model.dtype = "float32"
  c.model.param_dtype = "float32"
  c.model.attention_impl = ""  # '' lets XLA choose; 'cudnn' on GPUs
  c.model.qk_norm = False  # LayerNorm on queries/keys: stable at higher learning rates
  c.model.zero_init_residual = True  # blocks start as identity: much faster early training

  c.loss = ml_collections.ConfigDict()
  c.loss.l2_weight = 1.0
  c.loss.vq_weight = 1.0
  c.loss.commitment_cost = 0.25  # β

  # Against codebook collapse: restart codes that no token picks.
  c.codebook = ml_collections.ConfigDict()
  c.codebook.restart_dead_codes = True
  c.codebook.usage_decay = 0.99
  c.codebook.dead_fraction = 0.1  # of the uniform share 1/codebook_size

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.learning_rate = 1e-3
  c.optimizer.warmup_steps = 100
  c.optimizer.schedule = "cosine"  # 'cosine' or 'constant' after warm-up
  c.optimizer.end_learning_rate_ratio = 0.1
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.99
  c.optimizer.weight_decay = 1e-4
  c.optimizer.grad_clip_norm = 1.0
  # Learning-rate factor for parameters outside the transformer stacks.
  c.optimizer.io_lr_multiplier = 10.0
  return c


DEFAULTS = {"cvivit": cvivit_defaults}


def _flat_keys(cfg: ml_collections.ConfigDict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in cfg.items():
    key = f"{prefix}{k}"
    if isinstance(v, ml_collections.ConfigDict):
      out.update(_flat_keys(v, key + "."))
    else:
      out[key] = v
  return out


def complete(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Rejects unknown keys and fills missing ones from the job's defaults."""
  job = config.get("job")
  if job not in DEFAULTS:
    raise ConfigError(f"config.job={job!r}: unknown job; expected one of {sorted(DEFAULTS)}")
  defaults = DEFAULTS[job]()
  given, known = _flat_keys(config), _flat_keys(defaults)
  unknown = sorted(k for k in given if k not in known
                   and not any(k.startswith(p + ".") for p in known))
  if unknown:
    raise ConfigError("unknown config key(s) for job '%s': %s" % (
        job, ", ".join(f"config.{k}" for k in unknown)))
  merged = defaults
  with merged.unlocked():
    for k, v in given.items():
      _set(merged, k, v)
  return merged


def _set(cfg: ml_collections.ConfigDict, dotted: str, value: Any) -> None:
  *parents, leaf = dotted.split(".")
  for p in parents:
    cfg = cfg[p]
  cfg[leaf] = value


def _require(ok: bool, key: str, value: Any, why: str) -> None:
  if not ok:
    raise ConfigError(f"config.{key}={value!r}: {why}")


def _positive_ints(config: ml_collections.ConfigDict, keys: Iterable[str]) -> None:
  flat = _flat_keys(config)
  for k in keys:
    v = flat[k]
    _require(isinstance(v, int) and not isinstance(v, bool) and v > 0, k, v,
             "must be a positive integer")


def validate_cvivit(config: ml_collections.ConfigDict, num_devices: int,
                    process_count: int = 1) -> None:
  """Impossible values fail here, naming the key, before any compilation."""
  m, i = config.model, config.input
  _positive_ints(config, [
      "model.patch_size", "model.temporal_patch_size", "model.width", "model.num_heads",
      "model.head_dim", "model.mlp_dim", "model.spatial_depth", "model.temporal_depth",
      "model.codebook_size", "model.code_dim", "input.batch_size", "input.num_frames",
      "input.resolution", "log_every_steps", "checkpoint_every_steps", "keep_checkpoints"])
  _require(config.max_consecutive_nonfinite >= 0, "max_consecutive_nonfinite",
           config.max_consecutive_nonfinite, "must be >= 0 (0: never stop)")
  _require(isinstance(config.total_steps, int) and config.total_steps >= 0, "total_steps",
           config.total_steps, "must be a non-negative integer")
  tp = m.temporal_patch_size
  _require((i.num_frames - 1) % tp == 0, "input.num_frames", i.num_frames,
           f"must be 1 + k·model.temporal_patch_size ({tp}) frames, e.g. "
           f"{1 + tp * max(1, (i.num_frames - 1) // tp)}")
  _require(i.resolution % m.patch_size == 0, "input.resolution", i.resolution,
           f"must be divisible by model.patch_size ({m.patch_size})")
  _require(0.0 <= i.video_ratio <= 1.0, "input.video_ratio", i.video_ratio,
           "must be in [0, 1]")
  _require(i.data in ("shapes", "shards", "tfds"), "input.data", i.data,
           "must be 'shapes', 'shards' or 'tfds'")
  _require(0.0 < i.random_crop_min_scale <= 1.0, "input.random_crop_min_scale",
           i.random_crop_min_scale, "must be in (0, 1]")
  if i.data == "tfds":
    if i.video_ratio > 0:
      _require(bool(i.tfds_video), "input.tfds_video", i.tfds_video,
               "is required when input.data='tfds' and input.video_ratio > 0")
    if i.video_ratio < 1:
      _require(bool(i.tfds_image), "input.tfds_image", i.tfds_image,
               "is required when input.data='tfds' and input.video_ratio < 1")
  if i.data == "shards":
    if i.video_ratio > 0:
      _require(bool(i.video_shards), "input.video_shards", i.video_shards,
               "is required when input.data='shards' and input.video_ratio > 0")
    if i.video_ratio < 1:
      _require(bool(i.image_shards), "input.image_shards", i.image_shards,
               "is required when input.data='shards' and input.video_ratio < 1")
  _require(i.num_workers >= 0, "input.num_workers", i.num_workers, "must be >= 0")
  for key in ("model.dtype", "model.param_dtype"):
    value = _flat_keys(config)[key]
    try:
      jnp.dtype(value)
    except TypeError:
      raise ConfigError(f"config.{key}={value!r}: not a dtype name (e.g. 'float32', 'bfloat16')")
  _require(0.0 < config.codebook.usage_decay < 1.0, "codebook.usage_decay",
           config.codebook.usage_decay, "must be in (0, 1)")
  _require(config.optimizer.schedule in ("cosine", "constant"), "optimizer.schedule",
           config.optimizer.schedule, "must be 'cosine' or 'constant'")
  _require(config.optimizer.learning_rate > 0, "optimizer.learning_rate",
           config.optimizer.learning_rate, "must be > 0")
  try:
    mesh_shape = sharding.resolve_mesh_shape(config.mesh.shape, num_devices)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  batch_ways = _batch_ways(config, mesh_shape)
  _require(i.batch_size % batch_ways == 0, "input.batch_size", i.batch_size,
           f"must be divisible by the {batch_ways} ways the mesh {mesh_shape} splits the batch")
  _require(i.batch_size % process_count == 0, "input.batch_size", i.batch_size,
           f"must be divisible by the {process_count} processes")
  _require(m.num_heads % mesh_shape[2] == 0, "model.num_heads", m.num_heads,
           f"must be divisible by the tensor-parallel mesh axis ({mesh_shape[2]})")


def _batch_ways(config: ml_collections.ConfigDict, mesh_shape: tuple[int, ...]) -> int:
  sizes = dict(zip(sharding.MESH_AXES, mesh_shape))
  for name, axes in config.logical_axis_rules:
    if name == "act_batch":
      if axes is None:
        return 1
      axes = [axes] if isinstance(axes, str) else axes
      n = 1
      for a in axes:
        if a not in sizes:
          raise ConfigError(f"config.logical_axis_rules: 'act_batch' maps to unknown mesh axis "
                            f"{a!r}; mesh axes are {sharding.MESH_AXES}")
        n *= sizes[a]
      return n
  return 1
