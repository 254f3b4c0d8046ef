"""How a model computes (`config.model.*` beside its sizes): dtypes, remat, scan, kernels.

The tokenizer and the generator take the same keys.
"""
from __future__ import annotations

import ml_collections

from phenaki_jax.config import errors


def defaults() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.remat = False
  # What the backward pass keeps (layers.REMAT_POLICIES: 'none', 'full',
  # 'dots_saveable', 'dots_with_no_batch_dims_saveable', 'save_attention_out',
  # ...); '' follows model.remat.
  c.remat_policy = ""
  c.scan_layers = False  # nn.scan over each stack's blocks: one block to compile
  c.dtype = "float32"  # compute dtype; 'bfloat16' keeps float32 master weights
  c.param_dtype = "float32"
  # '' picks cuDNN's fused kernel where it applies (GPU, bf16), else XLA;
  # 'xla'; 'cudnn' (falls back to 'xla' with a warning where unavailable).
  c.attention_impl = ""
  # Persistent XLA compilation cache (a directory; '' = off, or the
  # JAX_COMPILATION_CACHE_DIR environment variable): restarts skip compiling.
  c.compilation_cache_dir = ""
  return c


def check(config: ml_collections.ConfigDict) -> None:
  for key in ("model.dtype", "model.param_dtype"):
    errors.check_dtype(config, key)
