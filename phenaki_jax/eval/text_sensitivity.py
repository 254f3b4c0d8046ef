"""Which words of a shapes prompt does a trained generator listen to?

Sampled accuracy (phenaki_jax/eval/shapes_score.py) says whether videos come
out right; it cannot say why one comes out wrong: the model may not use the
word at all, or use it and fail to draw it. This asks the likelihood. For
held-out built-in clips, their tokens are masked (the same positions for every
caption) and the negative log-likelihood of the masked object tokens is taken
under the true caption, under the caption with one attribute swapped for
another value (size, colour, shape or motion), and with no text. A model that
uses a word pays for the wrong one: sensitivity = NLL(swapped) − NLL(true), in
nats per masked object token; 0 means the word is ignored. Background tokens
are left out: the object is where the words matter, and the many black tokens
would dilute every figure alike.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from phenaki_jax.data import synthetic
from phenaki_jax.eval import token_stats
from phenaki_jax.text.encoder import encode_text

ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "size": synthetic.SIZES,
    "colour": tuple(synthetic.COLOURS),
    "shape": synthetic.SHAPES,
    "motion": synthetic.MOTIONS,
}


def swapped_specs(specs: Sequence[synthetic.ShapesSpec], attribute: str,
                  rng: np.random.Generator) -> list[synthetic.ShapesSpec]:
  """The specs with `attribute` replaced by another of its values, drawn uniformly."""
  out = []
  for spec in specs:
    others = [v for v in ATTRIBUTES[attribute] if v != getattr(spec, attribute)]
    out.append(dataclasses.replace(spec, **{attribute: others[rng.integers(len(others))]}))
  return out


def held_out_clips(num_clips: int, num_frames: int, resolution: int, seed: int
                   ) -> tuple[list[synthetic.ShapesSpec], np.ndarray]:
  """(specs, uint8 clips (N, T, H, W, 3)) drawn apart from the training stream."""
  rng = np.random.default_rng([seed, 0x7e57])
  specs = [synthetic.sample_spec(rng, resolution, num_frames) for _ in range(num_clips)]
  return specs, np.stack([synthetic.render_clip(s, num_frames, resolution) for s in specs])


def measure(gen, *, num_clips: int = 48, mask_ratios: Sequence[float] = (0.5, 0.9, 1.0),
            seed: int = 0) -> dict[str, dict[str, float]]:
  """{f"mask_{ratio}": {"nll_true", "nll_none", "<attribute>": sensitivity, "none": ...}}.

  `gen` is a phenaki_jax.generator.Generator. "none" is NLL(no text) −
  NLL(true): how much the text as a whole is worth.
  """
  specs, clips = held_out_clips(num_clips, gen.num_frames, int(gen.config.input.resolution), seed)
  tokens = np.asarray(gen.tokenizer.encode(clips))
  flat = tokens.reshape(num_clips, -1)
  # Object tokens by their pixels, not by code: a tokenizer may give black
  # tubelets many codes (phenaki_jax/eval/token_stats.py).
  m = gen.tokenizer.config.model
  is_object = token_stats.object_token_mask(clips, m.patch_size,
                                            m.temporal_patch_size).reshape(flat.shape)
  rng = np.random.default_rng([seed, 1])

  @jax.jit
  def nll(ids, text_mask, inputs):
    context, mask = encode_text(
        gen.text, gen.params, gen.frozen_text_params, {"text_ids": ids, "text_mask": text_mask})
    logits = gen.model.apply({"params": gen.params["generator"]}, inputs, context, mask)
    logp = jax.nn.log_softmax(logits.reshape(num_clips, flat.shape[1], -1))
    return -jnp.take_along_axis(logp, jnp.asarray(flat)[..., None], axis=-1)[..., 0]

  captions = {"true": specs}
  for attribute in ATTRIBUTES:
    captions[attribute] = swapped_specs(specs, attribute, rng)
  encoded = {k: gen.encode_prompts([synthetic.caption_for(s) for s in v])
             for k, v in captions.items()}
  empty_ids, empty_mask = gen.encode_prompts([""] * num_clips)
  out = {}
  for ratio in mask_ratios:
    masked = rng.random(flat.shape) < ratio
    inputs = np.where(masked, gen.model.mask_id, flat).reshape(tokens.shape)
    scored = masked & is_object
    if not scored.any():
      raise ValueError(f"mask ratio {ratio}: no object token is masked in {num_clips} clips")

    def mean_nll(ids, text_mask):
      per_token = np.asarray(nll(jnp.asarray(ids), jnp.asarray(text_mask), jnp.asarray(inputs)))
      return float((per_token * scored).sum() / scored.sum())

    true = mean_nll(*encoded["true"])
    row = {"nll_true": true}
    for attribute in ATTRIBUTES:
      row[attribute] = mean_nll(*encoded[attribute]) - true
    # All-False mask: the input of the examples whose text was dropped in training.
    none = mean_nll(empty_ids, np.zeros_like(empty_mask))
    row["nll_none"], row["none"] = none, none - true
    out[f"mask_{ratio:g}"] = row
  return out
