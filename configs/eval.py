"""Offline evaluation of trained models.

  python -m phenaki_jax.main --config=configs/eval.py:tokenizer --workdir=runs/eval \
      --config.tokenizer.workdir=runs/cvivit
  python -m phenaki_jax.main --config=configs/eval.py:tokenizer_tiny --workdir=/tmp/e \
      --config.tokenizer.workdir=/tmp/t

Variants: 'tokenizer' (the default: a C-ViViT checkpoint on 256 held-out clips
like those it trained on: PSNR, SSIM, LPIPS (AlexNet), reconstruction FVD
(I3D at 224×224, all frames), codebook usage, tokens per clip; writes
WORKDIR/tokenizer_eval_step_N.json and .png; about 5 minutes on a 2-core CPU
for the default tokenizer), 'tokenizer_tiny' (the tokenizer of
`configs/cvivit.py:tiny`: 2 clips of 5 frames at 16×16, LPIPS with VGG16,
no FVD since I3D needs 9 frames; seconds; what the tests run).

Generated video (phenaki_jax/eval/eval_generated.py; writes WORKDIR/report.json, report.png):

  python -m phenaki_jax.main --config=configs/eval.py:generated --workdir=runs/eval_gen \
      --config.generated=runs/samples --config.reference=shapes
  python -m phenaki_jax.main --config=configs/eval.py:compare --workdir=runs/cmp \
      --config.reports=runs/eval_a/report.json,runs/eval_b/report.json

'generated' (FVD against the reference set under config.protocol: 256 clips,
I3D Kinetics-400 logits at 224, bilinear + antialiasing after a centre square
crop; the shapes benchmark and story metrics for built-in prompts; CLIP score
with --config.clip.path), 'generated_tiny' (4 clips of 9 frames per set, 2 per
I3D batch: what the tests run; for a `configs/maskgit.py:tiny` workdir, whose
clips have 5 frames, add --config.protocol.fvd=False), 'compare' (a table of
several reports; warns naming each protocol field that differs).

Frame prediction (phenaki_jax/eval/eval_prediction.py; writes
WORKDIR/frame_prediction_PRESET_step_N.json and .png):

  python -m phenaki_jax.main --config=configs/eval.py:frame_prediction --workdir=runs/fp \
      --config.generator.workdir=runs/maskgit --config.protocol.rollout=True
  python -m phenaki_jax.main --config=configs/eval.py:frame_prediction,kinetics ...

'frame_prediction' takes a preset: 'bair' (the default: 64×64, condition on
1 frame, predict 15) or 'kinetics' (64×64, 5 → 11), the paper's BAIR robot
pushing and Kinetics-600 settings; use them on those datasets (prepared
shards of their test splits, or a folder) with the published clip and
sample counts (the report names them). Held-out clips of the generator's
own data by default. A generator whose window is shorter than the protocol
(the default one's is 11 frames) is refused unless protocol.rollout=True.
'frame_prediction_tiny' (a `configs/maskgit.py:tiny` generator: 16×16,
1 → 4 frames, 4 clips, no FVD: what the tests run).
Every key and its default is in phenaki_jax/config/.
"""
from phenaki_jax.config import args
from phenaki_jax.config import schema


def get_config(arg: str = ""):
  arg = args.parse_arg(arg, "configs/eval.py", variant=args.OneOf(
      "tokenizer", "tokenizer_tiny", "generated", "generated_tiny", "compare",
      "frame_prediction", "frame_prediction_tiny"), preset=args.OneOf("bair", "kinetics"))
  if arg.preset != "bair" and arg.variant != "frame_prediction":
    raise ValueError(f"configs/eval.py: preset {arg.preset!r} is for frame_prediction only "
                     f"(e.g. --config=configs/eval.py:frame_prediction,{arg.preset})")
  if arg.variant == "tokenizer":
    config = schema.eval_tokenizer_defaults()
  elif arg.variant == "tokenizer_tiny":
    config = schema.eval_tokenizer_defaults()
    config.num_grid_clips = 2
    p = config.protocol
    p.num_clips, p.batch_size = 2, 2
    # 5-frame clips are too short for I3D (>= 9 frames): the report says FVD
    # was not computed. AlexNet's LPIPS is undefined below 31×31; VGG16's works.
    p.fvd = False
    p.lpips_net = "vgg16"
  elif arg.variant == "generated":
    config = schema.eval_generated_defaults()
  elif arg.variant == "generated_tiny":
    config = schema.eval_generated_defaults()
    p = config.protocol
    p.num_clips, p.num_frames, p.batch_size = 4, 9, 2  # FVD from 4 clips: a smoke test only
    config.batch_size = 2
    config.sampling.num_steps, config.sampling.max_steps = 4, 8
  elif arg.variant == "frame_prediction":
    config = schema.eval_prediction_defaults(arg.preset)
  elif arg.variant == "frame_prediction_tiny":
    config = schema.eval_prediction_defaults("bair")
    p = config.protocol
    p.context_frames, p.predict_frames, p.resolution = 1, 4, 16  # one 5-frame window
    p.num_clips, p.fvd, p.lpips_net = 4, False, "vgg16"  # I3D needs 9 frames; AlexNet 31 px
    config.batch_size, config.num_grid_clips = 2, 2
    config.sampling.num_steps, config.sampling.max_steps = 4, 8
  else:
    config = schema.eval_compare_defaults()
  config.lock()
  return config
