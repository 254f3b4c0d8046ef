"""Vector quantiser with a low-dimensional, l2-normalised codebook lookup.

As in ViT-VQGAN / Phenaki: encoder features are projected to a small code
dimension and l2-normalised, matched to the nearest l2-normalised code, and
projected back. Normalised low-dimensional lookup keeps far more of a large
codebook in use than raw Euclidean lookup in the model width.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from phenaki_jax.models.layers import DenseGeneral

Dtype = Any


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


def code_counts(codes: jax.Array, codebook_size: int) -> jax.Array:
  """How often each code occurs in `codes`: (codebook_size,) float32."""
  return jnp.zeros((codebook_size,), jnp.float32).at[codes.reshape(-1)].add(1.0)


def codebook_usage(codes: jax.Array, codebook_size: int) -> dict[str, jax.Array]:
  """Fraction of codes used in `codes` and the perplexity of their histogram."""
  counts = code_counts(codes, codebook_size)
  probs = counts / jnp.maximum(counts.sum(), 1.0)
  entropy = -jnp.sum(jnp.where(probs > 0, probs * jnp.log(jnp.where(probs > 0, probs, 1.0)), 0.0))
  return {
      "usage": jnp.mean((counts > 0).astype(jnp.float32)),
      "perplexity": jnp.exp(entropy),
  }


class VectorQuantizer(nn.Module):
  """Maps features (..., D) to codes (...) and quantised features (..., D).

  Returns (quantised, aux) where aux holds `codes`, `codebook_loss`
  (||sg(z) - e||², moves codes toward encoder outputs), `commitment_loss`
  (||z - sg(e)||², unweighted: the trainer multiplies it by β) and usage stats.
  Gradients pass straight through the lookup to the encoder.
  """
  codebook_size: int
  code_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    self.to_code = DenseGeneral(self.code_dim, kernel_axes=("embed", "code"),
                                dtype=jnp.float32, param_dtype=self.param_dtype)
    self.codebook = self.param(
        "codebook",
        nn.with_logical_partitioning(nn.initializers.normal(1.0), ("codebook", "code")),
        (self.codebook_size, self.code_dim), self.param_dtype)

  def normalized_codebook(self) -> jax.Array:
    return l2_normalize(jnp.asarray(self.codebook, jnp.float32))

  def quantize(self, x: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Features (..., D) -> (straight-through code vectors (..., code_dim), aux)."""
    z = l2_normalize(self.to_code(x.astype(jnp.float32)))
    codebook = self.normalized_codebook()
    # Both sides are unit vectors: nearest in l2 == largest dot product.
    similarity = jnp.einsum("...d,kd->...k", z, codebook)
    codes = jnp.argmax(similarity, axis=-1)
    e = jnp.take(codebook, codes, axis=0)
    aux = {
        "codes": codes,
        # The normalised encoder vectors and their quantisation errors: dead
        # codes restart at vectors the codebook serves worst.
        "encoder_vectors": jax.lax.stop_gradient(z),
        "quantization_errors": jax.lax.stop_gradient(jnp.sum(jnp.square(z - e), axis=-1)),
        "codebook_loss": jnp.mean(jnp.square(jax.lax.stop_gradient(z) - e)),
        "commitment_loss": jnp.mean(jnp.square(z - jax.lax.stop_gradient(e))),
        **codebook_usage(codes, self.codebook_size),
    }
    return z + jax.lax.stop_gradient(e - z), aux

  def lookup(self, codes: jax.Array) -> jax.Array:
    """Codes (...) -> code vectors (..., code_dim)."""
    return jnp.take(self.normalized_codebook(), codes, axis=0)

  def __call__(self, x: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    return self.quantize(x)


def restart_dead_codes(codebook: jax.Array, usage: jax.Array, encoder_vectors: jax.Array,
                       batch_counts: jax.Array, rng: jax.Array, *, decay: float,
                       dead_fraction: float,
                       errors: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Moves codes that (almost) no token picks onto this batch's encoder vectors.

  `usage` is an EMA of each code's share of tokens; a code whose share falls
  below dead_fraction × (1 / codebook_size) is re-initialised at an encoder
  vector and its usage reset to the uniform share, which gives it a few
  hundred steps to be picked before it can be restarted again. Vectors are
  drawn with probability proportional to their quantisation `errors` when
  given (as in k-means++): uniform draws land mostly on the background tokens
  that already have codes, and spend the restarts there.
  Returns (codebook, usage, number of codes restarted).
  """
  k = codebook.shape[0]
  share = batch_counts / jnp.maximum(batch_counts.sum(), 1.0)
  usage = decay * usage + (1.0 - decay) * share
  dead = usage < dead_fraction / k
  flat = encoder_vectors.reshape(-1, encoder_vectors.shape[-1])
  if errors is None:
    picks = jax.random.randint(rng, (k,), 0, flat.shape[0])
  else:
    # Inverse-CDF draws: jax.random.categorical would draw k × N Gumbel
    # numbers (8,192 codes × 1,536 tokens: a quarter of a reference-size CPU
    # step); this is k uniforms and a binary search each, same distribution.
    weights = jnp.maximum(errors.reshape(-1).astype(jnp.float32), 1e-12)
    cdf = jnp.cumsum(weights)
    targets = jax.random.uniform(rng, (k,), jnp.float32) * cdf[-1]
    picks = jnp.minimum(jnp.searchsorted(cdf, targets, side="right"), flat.shape[0] - 1)
  candidates = jnp.take(flat, picks, axis=0).astype(codebook.dtype)
  codebook = jnp.where(dead[:, None], candidates, codebook)
  usage = jnp.where(dead, 1.0 / k, usage)
  return codebook, usage, jnp.sum(dead.astype(jnp.int32))
