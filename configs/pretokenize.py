"""Pre-tokenise clips for the generator: C-ViViT codes (+ cached frozen-T5 embeddings).

  python -m phenaki_jax.main --config=configs/pretokenize.py --workdir=data/tokens \
      --config.tokenizer.workdir=runs/cvivit
  python -m phenaki_jax.main --config=configs/pretokenize.py --workdir=data/tokens \
      --config.tokenizer.workdir=runs/cvivit --config.input.data=shards \
      --config.input.video_shards=data/prepared --config.input.image_shards=data/prepared \
      --config.text.encoder=t5 --config.text.t5_path=/path/to/t5-v1_1-xl
  # then: configs/maskgit.py --config.input.data=tokens --config.input.token_shards=data/tokens

Variants: '' (the built-in shapes at the default tokenizer's 64×64, 11 frames:
20,000 clips + 5,000 images + 64 held-out clips), 'tiny' (the tokenizer of
`configs/cvivit.py:tiny`; 16 clips + 8 images; what the tests run).
Every key and its default is in phenaki_jax/config/.
"""
from phenaki_jax.config import args
from phenaki_jax.config import schema
from phenaki_jax.config import sizes


def get_config(arg: str = ""):
  arg = args.parse_arg(arg, "configs/pretokenize.py", variant=args.OneOf("default", "tiny"))
  config = schema.pretokenize_defaults()
  if arg.variant == "default":
    config.tokenizer.workdir = "runs/cvivit"
    config.num_video_examples = 20_000
    config.num_image_examples = 5_000
  elif arg.variant == "tiny":
    config.input.num_frames, config.input.resolution = sizes.CLIPS["tiny"]
    config.num_video_examples = 16
    config.num_image_examples = 8
    config.num_eval_examples = 4
    config.batch_size = 8
    config.text.max_length = 40
  config.lock()
  return config
