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
Every key and its default is in phenaki_jax/schema.py.
"""
from phenaki_jax.config import schema


def get_config(variant: str = ""):
  config = schema.maskgit_defaults()
  variant = variant or "default"
  if variant == "default":
    config.tokenizer.workdir = "runs/cvivit"  # where README's tokenizer command trains
  elif variant == "tiny":
    config.total_steps = 6
    config.log_every_steps = 1
    config.checkpoint_every_steps = 3
    config.eval_every_steps = 3
    config.num_eval_examples = 2
    config.input.batch_size = 8
    config.input.num_frames = 5
    config.input.resolution = 16
    config.input.story_context_frames = (1, 3)
    m = config.model
    m.codebook_size, m.token_grid = 64, (3, 4, 4)
    m.width, m.num_layers, m.num_heads, m.head_dim, m.mlp_dim = 32, 1, 2, 16, 64
    b = config.text.byte_encoder
    b.width, b.num_layers, b.num_heads, b.head_dim, b.mlp_dim = 32, 1, 2, 16, 64
    config.text.max_length = 40
    config.optimizer.warmup_steps = 2
  elif variant == "paper":
    config.total_steps = 1_000_000
    config.log_every_steps = 100
    config.checkpoint_every_steps = 2000
    config.eval_every_steps = 5000
    config.num_eval_examples = 64
    config.input.batch_size = 512
    config.input.num_frames = 11
    config.input.resolution = 128
    config.input.story_ratio = 0.0  # real data: the random-prefix task only
    m = config.model
    m.codebook_size, m.token_grid = 8192, (6, 16, 16)
    # About the paper's 1.8B-parameter generator (24 blocks of width 2048 with
    # self- and cross-attention are ~1.6B); not measured here.
    m.width, m.num_layers, m.num_heads, m.head_dim, m.mlp_dim = 2048, 24, 32, 64, 8192
    m.dtype, m.remat = "bfloat16", True
    config.text.encoder = "t5"  # needs --config.text.t5_path
    config.text.frozen = True
    config.text.max_length = 64
    config.text.dtype = "bfloat16"
    config.optimizer.learning_rate = 1e-4
    config.optimizer.warmup_steps = 10_000
    config.optimizer.b2 = 0.96
    config.optimizer.weight_decay = 0.045
    config.mesh.shape = (-1, 8, 1)  # FSDP over 8: the optimizer state does not fit replicated
  else:
    raise ValueError(f"configs/maskgit.py: unknown variant {variant!r}; "
                     "choose one of '', 'tiny', 'paper'")
  config.lock()
  return config
