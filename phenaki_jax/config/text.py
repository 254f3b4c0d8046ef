"""The text section (`config.text.*`): the encoder the generator cross-attends to.

The generator trainer, pre-tokenising (which caches a frozen T5's embeddings)
and through the generator's saved config, sampling and evaluation, read it.
"""
from __future__ import annotations

import ml_collections

from phenaki_jax.config import errors
from phenaki_jax.config import sizes

TEXT_ENCODERS = ("byte", "t5")
POSITIVE_KEYS = ("text.max_length",)  # the generator trainer checks it with its other sizes


def defaults() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # 'byte': UTF-8 bytes into a small T5 encoder trained with the generator
  # (needs no download); 't5': a pretrained T5 from text.t5_path.
  c.encoder = "byte"
  # A Hugging Face folder (*.safetensors, config.json, spiece.model) or a T5X
  # checkpoint (Orbax folder, .npz, .msgpack) with its SentencePiece model.
  c.t5_path = ""
  # SentencePiece model for a T5X checkpoint; '' looks for spiece.model or a
  # single *.model next to the checkpoint.
  c.vocab_path = ""
  c.frozen = True  # 't5' only: keep the pretrained encoder fixed
  c.max_length = 48  # text tokens per caption (bytes + EOS for 'byte')
  c.dtype = "float32"  # compute dtype of the text encoder
  c.byte_encoder = ml_collections.ConfigDict(sizes.BYTE_ENCODER["default"])
  return c


def check_encoder(config: ml_collections.ConfigDict, t5_path_hint: str = "") -> None:
  """text.encoder is known, and a 't5' one has its path."""
  t = config.text
  errors.require(t.encoder in TEXT_ENCODERS, "text.encoder", t.encoder,
                 f"must be one of {TEXT_ENCODERS}")
  if t.encoder == "t5":
    errors.require(bool(t.t5_path), "text.t5_path", t.t5_path,
                   "is required when text.encoder='t5'" + t5_path_hint)


def check(config: ml_collections.ConfigDict) -> None:
  """The generator trainer's text keys (after POSITIVE_KEYS)."""
  check_encoder(config, " (a Hugging Face T5 folder or a T5X checkpoint)")
  if config.text.encoder != "t5":
    errors.positive_ints(config, [f"text.byte_encoder.{k}" for k in
                                  ("width", "num_layers", "num_heads", "head_dim", "mlp_dim")])
  errors.check_dtype(config, "text.dtype")


def mesh_splits(config: ml_collections.ConfigDict) -> dict[str, tuple[int, str]]:
  """The byte encoder's sizes the mesh splits: {key: (value, logical axis)}."""
  if config.text.encoder != "byte":
    return {}
  b = config.text.byte_encoder
  return {"text.byte_encoder.num_heads": (b.num_heads, "heads"),
          "text.byte_encoder.width": (b.width, "embed"),
          "text.byte_encoder.mlp_dim": (b.mlp_dim, "mlp")}
