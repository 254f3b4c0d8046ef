"""The text encoder every job uses: host tokenizer + T5 encoder, and loading T5 weights.

Training, pre-tokenising, sampling and evaluation all build it from
config.text with build_text_encoder, so a caption becomes the same context
vectors everywhere.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from phenaki_jax import storage
from phenaki_jax.config.schema import ConfigError
from phenaki_jax.models import t5
from phenaki_jax.text import t5_weights, text_tokenizers


@dataclasses.dataclass(frozen=True)
class TextEncoder:
  """Host tokenizer + encoder module, and where the encoder's parameters live.

  Attributes:
    tokenizer: turns captions into ids on the host.
    module: the T5 encoder.
    trainable: parameters are in the train state (trained, EMA'd,
      checkpointed) under params['text_encoder']; otherwise they are a frozen
      input of the step.
    pretrained: numpy parameters loaded from config.text.t5_path, or None.
  """
  tokenizer: text_tokenizers.TextTokenizer
  module: t5.T5Encoder
  trainable: bool
  pretrained: Any = None

  @property
  def width(self) -> int:
    return self.module.d_model


def _find_sentencepiece(checkpoint: str) -> str:
  folder = checkpoint if storage.isdir(checkpoint) else storage.dirname(checkpoint)
  if storage.exists(storage.join(folder, "spiece.model")):
    return storage.join(folder, "spiece.model")
  found = storage.glob(folder, "*.model")
  if len(found) != 1:
    raise ConfigError(
        f"config.text.vocab_path='': found {len(found)} SentencePiece *.model files next to "
        f"{checkpoint} (need spiece.model or exactly one); set config.text.vocab_path")
  return found[0]


def load_t5(path: str, vocab_path: str, dtype: Any) -> tuple[t5.T5Encoder, Any,
                                                              text_tokenizers.TextTokenizer]:
  """A Hugging Face folder (*.safetensors) or a T5X checkpoint with its SentencePiece model.

  Local or gs:// (storage.py), the vocabulary too.
  """
  try:
    missing = not storage.exists(path)
  except storage.StorageError as e:
    raise ConfigError(f"config.text.t5_path={path!r}: {e}") from None
  if missing:
    raise ConfigError(f"config.text.t5_path={path!r}: does not exist")
  try:
    if storage.isdir(path) and storage.glob(path, "*.safetensors"):
      module, params, tokenizer = t5_weights.load_t5_encoder(path, dtype=dtype)
      if vocab_path:
        tokenizer = text_tokenizers.SentencePieceTokenizer(vocab_path)
    else:
      params, t5_config = t5_weights.load_t5x_params(path)
      module = t5_config.make_module(dtype=dtype)
      tokenizer = text_tokenizers.SentencePieceTokenizer(vocab_path or _find_sentencepiece(path))
  except (ValueError, OSError, NotImplementedError) as e:
    raise ConfigError(f"config.text.t5_path={path!r}: {e}") from None
  if tokenizer.vocab_size > module.vocab_size:
    raise ConfigError(f"config.text.t5_path={path!r}: its tokenizer emits {tokenizer.vocab_size} "
                      f"ids but the embedding has only {module.vocab_size} rows")
  return module, params, tokenizer


def build_text_encoder(text_cfg: ml_collections.ConfigDict) -> TextEncoder:
  dtype = jnp.dtype(text_cfg.dtype)
  if text_cfg.encoder == "byte":
    b = text_cfg.byte_encoder
    # ByT5's vocabulary size (bytes + specials, padded to 384).
    sizes = t5.T5EncoderConfig(vocab_size=t5.BYT5_TINY.vocab_size, d_model=b.width,
                               d_kv=b.head_dim, d_ff=b.mlp_dim, num_heads=b.num_heads,
                               num_layers=b.num_layers)
    return TextEncoder(text_tokenizers.ByteTokenizer(), sizes.make_module(dtype=dtype),
                       trainable=True)
  module, params, tokenizer = load_t5(text_cfg.t5_path, text_cfg.vocab_path, dtype)
  return TextEncoder(tokenizer, module, trainable=not text_cfg.frozen, pretrained=params)


def tokenize_captions(batch: Mapping[str, Any], tokenizer: text_tokenizers.TextTokenizer,
                      max_length: int) -> dict[str, np.ndarray]:
  """Host side: batch['caption'] (B,) strings -> text_ids / text_mask (B, max_length).

  A batch with cached text embeddings (pre-tokenised data) has no captions.
  """
  if "caption" not in batch:
    return dict(batch)
  out = {k: v for k, v in batch.items() if k != "caption"}
  ids, mask = tokenizer.encode_batch([str(c) for c in batch["caption"]], max_length)
  out["text_ids"], out["text_mask"] = ids, mask
  return out


def encode_text(text: TextEncoder, params: Any, frozen_text_params: Any,
                batch: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
  """(context (B, L, D), mask (B, L)) from precomputed embeddings or the encoder."""
  if "text_embeddings" in batch:
    return batch["text_embeddings"], batch["text_mask"].astype(jnp.bool_)
  text_params = params["text_encoder"] if text.trainable else frozen_text_params
  context, mask = text.module.apply({"params": text_params}, batch["text_ids"],
                                    batch["text_mask"])
  if not text.trainable:
    context = jax.lax.stop_gradient(context)
  return context, mask
