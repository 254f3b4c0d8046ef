"""Sampling: a trained generator turns prompts into videos.

  python -m phenaki_jax.main --config=configs/sample.py --workdir=runs/samples
  python -m phenaki_jax.main --config=configs/sample.py --workdir=runs/samples \
      --config.prompts='a large red circle moves right;a small blue square moves up'
  python -m phenaki_jax.main --config=configs/sample.py:shapes_eval --workdir=runs/score
  python -m phenaki_jax.main --config=configs/sample.py:tiny --workdir=/tmp/s \
      --config.generator.workdir=/tmp/g
  python -m phenaki_jax.preflight --config=configs/sample.py:paper --devices=8   # memory

Variants: '' (default: the generator of `configs/maskgit.py` in runs/maskgit,
a handful of built-in prompts), 'shapes_eval' (the default generator on 60
balanced prompts of the built-in grammar, each scored for colour, shape, size
and motion; accuracy in samples.json), 'tiny' (a `configs/maskgit.py:tiny`
generator, 2 prompts, 4 steps, batches of 8 so that 8 devices split them;
what the tests run), 'paper' (a `configs/maskgit.py:paper` generator with its
T5-XXL on an 8-way 'tensor' axis, the rest data-parallel: what
`python -m phenaki_jax.preflight --config=configs/sample.py:paper` checks).
The job runs on every device of every process: config.mesh.shape (default
data-parallel; config.batch_size must divide by data·fsdp).
Prompts on the command line: --config.prompts='first prompt;second prompt'.
Stories: --config.story='first;second' or --config.storyboard=story.yaml, with
two experimental switches (off by default; measured in benchmarks/RESULTS.md):
--config.sampling.memory_guidance_scale=1.0 (a generator trained with
model.memory_token_frames > 0) and --config.sampling.seam_blending=True.
Every key and its default is in phenaki_jax/config/.
"""
from phenaki_jax.config import args
from phenaki_jax.config import schema

_DEFAULT_PROMPTS = (
    "a large red circle moves right",
    "a small blue square moves up",
    "a large yellow triangle moves left",
    "a small green circle moves down",
    "a large white square stays still",
    "a small magenta triangle moves right",
    "a large cyan circle moves up",
    "a small red square moves left",
)


def get_config(arg: str = ""):
  arg = args.parse_arg(arg, "configs/sample.py",
                       variant=args.OneOf("default", "shapes_eval", "tiny", "paper"))
  config = schema.sample_defaults()
  if arg.variant == "default":
    config.generator.workdir = "runs/maskgit"  # where README's generator command trains
    config.prompts = ";".join(_DEFAULT_PROMPTS)
  elif arg.variant == "shapes_eval":
    config.generator.workdir = "runs/maskgit"
    config.shapes_eval = 60
    config.batch_size = 12
  elif arg.variant == "tiny":
    config.prompts = "a large red circle moves right;a small blue square"
    config.batch_size = 8  # one clip per device on the tests' 8 simulated devices
    config.sampling.num_steps = 4
    config.sampling.max_steps = 8
  elif arg.variant == "paper":
    config.generator.workdir = "runs/maskgit-paper"  # launch/README.md: $B/runs/maskgit-paper
    config.prompts = ";".join(_DEFAULT_PROMPTS)
    # 1.65 B generator + 4.8 B T5-XXL encoder weights (float32, 24 GiB) split
    # 8 ways by 'tensor' (heads, mlp, vocab): whole prompt batches per device.
    config.mesh.shape = (-1, 1, 8)
    config.batch_size = 8
  config.lock()
  return config
