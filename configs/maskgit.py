"""MaskGIT generator training on the tokens of a trained, frozen C-ViViT.

  python -m phenaki_jax.main --config=configs/maskgit.py --workdir=runs/maskgit
  python -m phenaki_jax.main --config=configs/maskgit.py:tiny --workdir=/tmp/g \
      --config.tokenizer.workdir=/tmp/t
  python -m phenaki_jax.main --config=configs/maskgit.py:paper --workdir=gs://... \
      --config.tokenizer.workdir=gs://... --config.text.t5_path=/path/to/t5

Variants: '' (default: the tokenizer of `configs/cvivit.py` in runs/cvivit,
64×64, 11 frames → 6×8×8 = 384 tokens of 256 codes; a byte-level text
encoder trained alongside; CPU-friendly), 'tiny' (seconds; the tokenizer of
`configs/cvivit.py:tiny`: 16×16, 5 frames → 3×4×4 tokens of 64 codes; what the
tests run), 'paper' (paper scale for pods: the tokenizer of
`configs/cvivit.py:paper`, 6×16×16 = 1,536 tokens of 8,192 codes, a frozen
pretrained T5 from text.t5_path, bf16, remat).
Long-term memory for stories (experimental): --config.model.memory_token_frames=1
(memory.drop_rate sets how often it is dropped for its own guidance).
Every key and its default is in phenaki_jax/config/.
"""
from phenaki_jax.config import args
from phenaki_jax.config import schema
from phenaki_jax.config import sizes


def get_config(arg: str = ""):
  arg = args.parse_arg(arg, "configs/maskgit.py", variant=args.OneOf("default", "tiny", "paper"))
  config = schema.maskgit_defaults()
  if arg.variant == "default":
    config.tokenizer.workdir = "runs/cvivit"  # where README's tokenizer command trains
  elif arg.variant == "tiny":
    config.total_steps = 6
    config.log_every_steps = 1
    config.checkpoint_every_steps = 3
    config.eval_every_steps = 3
    config.num_eval_examples = 2
    config.input.batch_size = 8
    config.input.num_frames, config.input.resolution = sizes.CLIPS["tiny"]
    config.input.story_context_frames = (1, 3)
    config.model.update(sizes.generator_size("tiny"))
    config.text.byte_encoder.update(sizes.BYTE_ENCODER["tiny"])
    config.text.max_length = 40
    config.optimizer.warmup_steps = 2
  elif arg.variant == "paper":
    config.total_steps = 1_000_000
    config.log_every_steps = 100
    config.checkpoint_every_steps = 2000
    config.eval_every_steps = 5000
    config.num_eval_examples = 64
    config.input.batch_size = 512
    config.input.num_frames, config.input.resolution = sizes.CLIPS["paper"]
    config.input.story_ratio = 0.0  # real data: the random-prefix task only
    config.model.update(sizes.generator_size("paper"))
    config.model.dtype, config.model.remat = "bfloat16", True
    config.text.encoder = "t5"  # needs --config.text.t5_path
    config.text.frozen = True
    config.text.max_length = 64
    config.text.dtype = "bfloat16"
    config.optimizer.learning_rate = 1e-4
    config.optimizer.warmup_steps = 10_000
    config.optimizer.b2 = 0.96
    config.optimizer.weight_decay = 0.045
    config.mesh.shape = (-1, 8, 1)  # FSDP over 8: the optimizer state does not fit replicated
  config.lock()
  return config
