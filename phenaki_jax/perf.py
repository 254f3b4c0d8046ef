"""Performance helpers: persistent compilation cache, analytic FLOP counts, peak rates.

FLOP counts are of the model's matmuls ("model FLOPs", the MFU convention):
one multiply-add = 2 FLOPs; a train step = 3 × forward (the backward pass
costs two forwards: gradients of the activations and of the weights);
rematerialised recompute is not counted (XLA's own count includes it).
Elementwise work (norms, softmax, GELU, the optimizer) is left out; it is
small next to the matmuls at these widths.

Per token of a sequence of length T, a transformer block of width d, heads·
head_dim = a, MLP width m costs, forward:
    2·d·3a (q, k, v) + 2·T·a (q·kᵀ) + 2·T·a (p·v) + 2·a·d (out) + 2·2·d·m (MLP)
and with cross-attention to Lc context vectors, per query token
    2·d·a (q) + 4·Lc·a (scores, values) + 2·a·d (out), plus per context
    vector and block 2·d·2a (k, v).
Causal attention is counted in full (XLA computes the masked half too).
"""
from __future__ import annotations

from typing import Any

import jax
from absl import logging

from phenaki_jax import storage


# --- Persistent compilation cache.

def setup_compilation_cache(directory: str = "") -> str | None:
  """Turns JAX's persistent compilation cache on at `directory`.

  '' changes nothing: JAX then follows its own settings, e.g. the
  JAX_COMPILATION_CACHE_DIR environment variable. With a directory, every
  compiled program is stored (no minimum compile time or size), so a
  restarted run, or a second process with the same program, loads instead of
  compiling. Returns the directory in use, or None.
  """
  if not directory:
    return None
  directory = storage.absolute(directory)
  storage.makedirs(directory)  # local only: a gs:// cache needs no folder made
  from jax._src import compilation_cache  # pylint: disable=g-import-not-at-top
  if jax.config.jax_compilation_cache_dir != directory:
    jax.config.update("jax_compilation_cache_dir", directory)
    # The cache object is made on first use: a process that compiled before
    # this call would keep using the old (or no) cache without a reset.
    compilation_cache.reset_cache()
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  logging.info("persistent compilation cache: %s", directory)
  return directory


# --- Analytic FLOPs.

def transformer_block_flops(tokens: int, seq_len: int, width: int, heads: int, head_dim: int,
                            mlp_dim: int, context_len: int = 0, context_sequences: int = 0
                            ) -> int:
  """Forward FLOPs of one block over `tokens` tokens in sequences of `seq_len`.

  With cross-attention (context_len > 0), `context_sequences` sequences of
  context_len vectors are projected to keys and values once per block.
  """
  a = heads * head_dim
  per_token = 2 * width * 3 * a + 4 * seq_len * a + 2 * a * width + 4 * width * mlp_dim
  flops = tokens * per_token
  if context_len:
    flops += tokens * (2 * width * a + 4 * context_len * a + 2 * a * width)
    flops += context_sequences * context_len * 2 * width * 2 * a
  return flops


def cvivit_forward_flops(model_cfg: Any, *, batch: int, num_frames: int, resolution: int,
                         channels: int = 3, encoder_only: bool = False) -> dict[str, int]:
  """Forward FLOPs of C-ViViT on (batch, num_frames, resolution², channels), by part."""
  m = model_cfg
  p, tp, d = m.patch_size, m.temporal_patch_size, m.width
  g = (resolution // p) ** 2
  t = 1 + (num_frames - 1) // tp
  n = batch * t * g
  block = dict(width=d, heads=m.num_heads, head_dim=m.head_dim, mlp_dim=m.mlp_dim)
  spatial = m.spatial_depth * transformer_block_flops(n, g, **block)
  temporal = m.temporal_depth * transformer_block_flops(n, t, **block)
  parts = {
      # Patch embedding: the first frame's p×p patches, then t_p×p×p tubelets.
      "patch_embed": 2 * batch * g * (p * p * channels) * d
                     + 2 * batch * (t - 1) * g * (tp * p * p * channels) * d,
      "encoder_transformers": spatial + temporal,
      # To the code space, and the similarity to every code.
      "quantizer": 2 * n * d * m.code_dim + 2 * n * m.code_dim * m.codebook_size,
  }
  if not encoder_only:
    parts["decoder_transformers"] = spatial + temporal
    parts["from_code_and_unpatch"] = (
        2 * n * m.code_dim * d + 2 * batch * g * d * (p * p * channels)
        + 2 * batch * (t - 1) * g * d * (tp * p * p * channels))
  return parts


def cvivit_train_flops(model_cfg: Any, *, batch: int, num_frames: int, resolution: int,
                       channels: int = 3) -> tuple[int, str]:
  """(FLOPs of one L2 + VQ train step, the formula as text).

  3 × forward, except the code similarity (argmax: no gradient), counted once.
  Perceptual networks and the GAN are not counted.
  """
  parts = cvivit_forward_flops(model_cfg, batch=batch, num_frames=num_frames,
                               resolution=resolution, channels=channels)
  m = model_cfg
  n = batch * (1 + (num_frames - 1) // m.temporal_patch_size) * (resolution // m.patch_size) ** 2
  similarity = 2 * n * m.code_dim * m.codebook_size
  total = 3 * (sum(parts.values()) - similarity) + similarity
  formula = (
      "3·[patch/tubelet embed 2·B·g·(p²c + (t-1)·t_p·p²c)·d + 2·(S+T_d)·N·(6·d·a + 2·d·a + 4·d·m) "
      "+ attention 4·a·N·(S·g + T_d·t) (both per encoder and decoder) + to/from code 4·N·d·c "
      "+ unpatch] + code similarity 2·N·c·K (forward only); N = B·t·g tokens, t = 1+(T-1)/t_p, "
      "g = (res/p)², a = heads·head_dim, S/T_d = spatial/temporal depth, K codes of dim c")
  return total, formula


def maskgit_forward_flops(model_cfg: Any, *, batch: int, text_len: int, text_width: int
                          ) -> dict[str, int]:
  """Forward FLOPs of the MaskGIT generator on a full token grid, by part."""
  m = model_cfg
  t, h, w = tuple(m.token_grid)
  n_seq = t * h * w
  n = batch * n_seq
  lc = text_len + 1  # the null text token
  block = transformer_block_flops(n, n_seq, m.width, m.num_heads, m.head_dim, m.mlp_dim,
                                  context_len=lc, context_sequences=batch)
  return {
      "text_projection": 2 * batch * text_len * text_width * m.width,
      "transformer": m.num_layers * block,
      "logits": 2 * n * m.width * m.codebook_size,
  }


def maskgit_train_flops(model_cfg: Any, *, batch: int, text_len: int, text_width: int
                        ) -> tuple[int, str]:
  """(FLOPs of one generator train step, the formula as text): 3 × forward."""
  parts = maskgit_forward_flops(model_cfg, batch=batch, text_len=text_len, text_width=text_width)
  formula = (
      "3·[L·(N·(6·d·a + 2·d·a + 4·d·m + 4·N_seq·a) + cross N·(4·d·a + 4·Lc·a) + B·Lc·4·d·a) "
      "+ logits 2·N·d·V + text projection 2·B·L_text·D_text·d]; N = B·t·h·w tokens, "
      "Lc = L_text + 1 (null token), a = heads·head_dim")
  return 3 * sum(parts.values()), formula


def maskgit_sampling_flops(model_cfg: Any, *, batch: int, text_len: int, text_width: int,
                           steps: int, guidance: bool) -> int:
  """Forward FLOPs of decoding: one generator pass per step, doubled batch with guidance."""
  b = batch * (2 if guidance else 1)
  parts = maskgit_forward_flops(model_cfg, batch=b, text_len=text_len, text_width=text_width)
  return steps * sum(parts.values())


# --- Peak rates for MFU.

# Dense bf16 TFLOP/s per chip (vendor figures, no sparsity).
PEAK_BF16_TFLOPS = {
    "H100": 989.0,
    "H200": 989.0,
    "TPU v5p": 459.0,
    "TPU v5e": 197.0,
    "TPU v5 lite": 197.0,
    "TPU v4": 275.0,
}


def peak_tflops(device: Any = None) -> float | None:
  """The table's peak for this device kind, or None (CPUs, unknown chips)."""
  device = device or jax.devices()[0]
  kind = getattr(device, "device_kind", "")
  for name, peak in PEAK_BF16_TFLOPS.items():
    if name.lower() in kind.lower():
      return peak
  return None
