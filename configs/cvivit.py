"""C-ViViT tokenizer training.

  python -m phenaki_jax.main --config=configs/cvivit.py --workdir=runs/cvivit
  python -m phenaki_jax.main --config=configs/cvivit.py:tiny --workdir=/tmp/t
  python -m phenaki_jax.main --config=configs/cvivit.py:paper --workdir=gs://...

Variants: '' (default: 64×64, 11 frames, trains on a 2-core CPU in minutes),
'tiny' (seconds; what the tests run), 'paper' (the paper's tokenizer: 128×128,
11 frames, 8×8 patches, temporal patch 2 → 6×16×16 = 1,536 tokens, 4 spatial +
4 temporal layers per side, width 512, 8,192 codes).
Append ',l2vq' to any variant for the L2 + L_VQ baseline objective (no GAN,
no perceptual networks), e.g. --config=configs/cvivit.py:tiny,l2vq.
Every key and its default is in phenaki_jax/config/.
"""
from phenaki_jax.config import args
from phenaki_jax.config import schema
from phenaki_jax.config import sizes


def get_config(arg: str = ""):
  arg = args.parse_arg(arg, "configs/cvivit.py", variant=args.OneOf("default", "tiny", "paper"),
                       l2vq=False)
  config = schema.cvivit_defaults()
  if arg.variant == "tiny":
    config.total_steps = 6
    config.log_every_steps = 1
    config.checkpoint_every_steps = 3
    config.eval_every_steps = 3
    config.num_eval_examples = 2
    p = config.eval_protocol
    p.num_clips, p.batch_size = 2, 8  # one (padded) batch split over the tests' 8 devices
    p.fvd = False  # I3D logits need >= 9 frames; these clips have 5
    p.lpips_net = "vgg16"  # AlexNet's stride-4 stem needs more than 16 px
    config.input.batch_size = 8
    config.input.num_frames, config.input.resolution = sizes.CLIPS["tiny"]
    config.model.update(sizes.TOKENIZER["tiny"])
    config.optimizer.warmup_steps = 2
    config.gan.start_step = 2  # the GAN is on for most of the 6 steps
    config.loss.perceptual_start_step = 0
    config.gan.base_features = 8
    config.gan.channel_multipliers = (1, 2)
    config.gan.input_patch = 1
    config.gan.r1_every = 1  # every step exercises R1
  elif arg.variant == "paper":
    config.total_steps = 1_000_000
    config.log_every_steps = 100
    config.checkpoint_every_steps = 2000
    config.eval_every_steps = 5000
    config.eval_protocol.num_clips = 256
    config.eval_protocol.batch_size = 64  # splits over data-parallel meshes of up to 64 chips
    config.input.batch_size = 256
    config.input.num_frames, config.input.resolution = sizes.CLIPS["paper"]
    config.model.update(sizes.TOKENIZER["paper"])
    config.model.dtype = "bfloat16"
    config.optimizer.learning_rate = 1e-4
    config.optimizer.warmup_steps = 10_000
    config.optimizer.io_lr_multiplier = 1.0  # not yet measured at this scale
    config.loss.video_perceptual_clips = 0  # every clip
    config.gan.start_step = 0
    config.loss.perceptual_start_step = 0
    config.loss.max_gradient_ratio = 0.0  # the paper's weights as published
    config.gan.base_features, config.gan.channel_multipliers = 64, (1, 2, 4, 8)
    config.gan.input_patch = 1
    config.gan.lecam_weight = 0.001
  if arg.l2vq:
    # The baseline objective: L2 + L_VQ only, no GAN or perceptual networks.
    config.loss.adversarial_weight = 0.0
    config.loss.lpips_weight = 0.0
    config.loss.video_perceptual_weight = 0.0
  config.lock()
  return config
