"""Model sizes, written once: the configs' tiny / default / paper, and the benchmarks'.

configs/cvivit.py, configs/maskgit.py (and the defaults in schema.py) take
their `model.*` / `text.byte_encoder.*` sizes from here, and the generator's
codebook and token grid follow from its tokenizer's (`generator_model`), so a
size is never typed in two places. benchmarks/bench_configs.py uses the same
tables, plus the few sizes only the benchmarks run (BENCH_*).
"""
from __future__ import annotations

from typing import Mapping

# (num_frames, resolution) of the clips each tokenizer size is trained on.
CLIPS = {
    "tiny": (5, 16),  # seconds on a CPU: what the tests run
    "default": (11, 64),  # minutes on a 2-core CPU
    "paper": (11, 128),  # the paper's 128x128, 11 frames
}

# The C-ViViT tokenizer's model.* sizes (configs/cvivit.py).
TOKENIZER = {
    "tiny": dict(patch_size=4, temporal_patch_size=2, width=32, num_heads=2, head_dim=16,
                 mlp_dim=64, spatial_depth=1, temporal_depth=1, codebook_size=64, code_dim=8),
    # 256 codes, not 1,024: the generator can learn words from them (benchmarks/RESULTS.md).
    "default": dict(patch_size=8, temporal_patch_size=2, width=128, num_heads=4, head_dim=32,
                    mlp_dim=512, spatial_depth=2, temporal_depth=2, codebook_size=256,
                    code_dim=32),
    # The paper's: 6x16x16 = 1,536 tokens of 8,192 codes.
    "paper": dict(patch_size=8, temporal_patch_size=2, width=512, num_heads=8, head_dim=64,
                  mlp_dim=2048, spatial_depth=4, temporal_depth=4, codebook_size=8192,
                  code_dim=32),
}

# The MaskGIT transformer's model.* sizes (configs/maskgit.py); its codebook_size
# and token_grid come from the tokenizer (generator_model).
GENERATOR = {
    "tiny": dict(width=32, num_layers=1, num_heads=2, head_dim=16, mlp_dim=64),
    "default": dict(width=256, num_layers=4, num_heads=4, head_dim=64, mlp_dim=1024),
    # About the paper's 1.8B parameters (these 24 blocks are ~1.6B); not measured here.
    "paper": dict(width=2048, num_layers=24, num_heads=32, head_dim=64, mlp_dim=8192),
}

# The byte-level text encoder trained with the generator (text.byte_encoder.*);
# the paper size uses a pretrained T5 instead.
BYTE_ENCODER = {
    "tiny": dict(width=32, num_layers=1, num_heads=2, head_dim=16, mlp_dim=64),
    "default": dict(width=128, num_layers=2, num_heads=4, head_dim=32, mlp_dim=256),
}

# Sizes only the benchmarks run (benchmarks/bench_configs.py). 'reference' and 'gpu'
# are pinned, whatever the defaults above become, so their figures stay comparable;
# 'tiny' is a smoke test.
BENCH_TOKENIZER = {
    # STACK.md's side-by-side with phenaki-pytorch on a 2-core CPU.
    "reference": dict(patch_size=8, temporal_patch_size=2, width=256, num_heads=4,
                      head_dim=64, mlp_dim=1024, spatial_depth=2, temporal_depth=2,
                      codebook_size=8192, code_dim=32),
    "tiny": dict(TOKENIZER["tiny"], patch_size=8, code_dim=32),
    "gpu": TOKENIZER["paper"],  # configs/cvivit.py:paper
}
BENCH_GENERATOR = {
    "reference": dict(width=256, num_layers=4, num_heads=4, head_dim=64, mlp_dim=1024),
    "tiny": GENERATOR["tiny"],
    # Issue 11's ~300M-parameter generator for one GPU.
    "gpu": dict(width=1024, num_layers=17, num_heads=16, head_dim=64, mlp_dim=4096),
}
BENCH_BYTE_ENCODER = {"tiny": dict(width=16, num_layers=1, num_heads=2, head_dim=8, mlp_dim=32)}


def token_grid(tokenizer: Mapping[str, int], num_frames: int,
               resolution: int) -> tuple[int, int, int]:
  """(token frames, h, w) the tokenizer makes of a clip: 1 + (frames - 1) / t_p frames."""
  side = resolution // tokenizer["patch_size"]
  return (1 + (num_frames - 1) // tokenizer["temporal_patch_size"], side, side)


def generator_model(tokenizer: Mapping[str, int], clip: tuple[int, int],
                    generator: Mapping[str, int]) -> dict:
  """The generator's model.* sizes on the tokens of `tokenizer` for `clip` clips."""
  return dict(codebook_size=tokenizer["codebook_size"],
              token_grid=token_grid(tokenizer, *clip), **generator)


def generator_size(size: str) -> dict:
  """model.* of the generator of a named size, on the tokens of the tokenizer of that size."""
  return generator_model(TOKENIZER[size], CLIPS[size], GENERATOR[size])
