"""Text tokenizers for the T5 encoder: byte-level (ByT5) and SentencePiece.

Both follow T5's id conventions: pad = 0, eos = 1, unk = 2, an EOS appended
to every text, and right padding with 0. `encode_batch` returns fixed-shape
numpy arrays so that batches have static shapes on device.
"""
from __future__ import annotations

import abc
import os
from typing import Sequence

import numpy as np

from phenaki_jax import storage

PAD_ID = 0
EOS_ID = 1
UNK_ID = 2


class TextTokenizer(abc.ABC):
  """Common interface: text <-> ids plus fixed-length batch encoding."""

  pad_id: int = PAD_ID
  eos_id: int = EOS_ID
  unk_id: int = UNK_ID

  @property
  @abc.abstractmethod
  def vocab_size(self) -> int:
    """Number of ids the tokenizer can emit (the model may pad beyond it)."""

  @abc.abstractmethod
  def _encode_pieces(self, text: str) -> list[int]:
    """Ids of `text` without EOS."""

  @abc.abstractmethod
  def decode(self, ids: Sequence[int]) -> str:
    """Text of `ids`, stopping at the first EOS and dropping padding."""

  def encode(self, text: str, add_eos: bool = True) -> list[int]:
    ids = self._encode_pieces(text)
    return ids + [self.eos_id] if add_eos else ids

  def encode_batch(self, texts: Sequence[str], max_length: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Encodes texts to (ids int32 [B, max_length], mask bool [B, max_length]).

    Texts longer than `max_length` are truncated but keep their EOS as the
    last token, as T5's preprocessing does, so the encoder always sees an
    end-of-text marker.

    Args:
      texts: strings to encode.
      max_length: fixed output length (>= 1).

    Returns:
      ids padded with `pad_id`, and the mask of real (non-pad) tokens.
    """
    if max_length < 1:
      raise ValueError(f'max_length must be >= 1, got {max_length}')
    if isinstance(texts, str):
      raise TypeError('encode_batch takes a sequence of strings, not a str')
    ids = np.full((len(texts), max_length), self.pad_id, np.int32)
    lengths = np.zeros((len(texts),), np.int32)
    for row, text in enumerate(texts):
      pieces = self._encode_pieces(text)[:max_length - 1] + [self.eos_id]
      ids[row, :len(pieces)] = pieces
      lengths[row] = len(pieces)
    # From lengths rather than `ids != pad_id`, so the mask stays right even
    # for a vocabulary that could emit id 0.
    mask = np.arange(max_length)[None, :] < lengths[:, None]
    return ids, mask


class ByteTokenizer(TextTokenizer):
  """ByT5-style UTF-8 bytes: id = byte + 3; needs no vocabulary file."""

  num_special = 3

  @property
  def vocab_size(self) -> int:
    return 256 + self.num_special

  def _encode_pieces(self, text: str) -> list[int]:
    return [b + self.num_special for b in text.encode('utf-8')]

  def decode(self, ids: Sequence[int]) -> str:
    out = bytearray()
    for i in np.asarray(ids).reshape(-1).tolist():
      if i == self.eos_id:
        break
      if self.num_special <= i < self.vocab_size:
        out.append(i - self.num_special)
    # Truncation can split a multi-byte character; drop the fragment.
    return out.decode('utf-8', errors='ignore')


class SentencePieceTokenizer(TextTokenizer):
  """T5's SentencePiece vocabulary (`spiece.model`), EOS appended, 0 padding.

  Attributes:
    model_path: path of the SentencePiece model file (local or gs://).
    extra_ids: T5's sentinel ids (<extra_id_0>...) counted after the pieces;
      they are never produced by `encode`, only counted in `vocab_size`.
  """

  def __init__(self, model_path: str | os.PathLike[str], extra_ids: int = 100):
    try:
      import sentencepiece  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError(
          'SentencePieceTokenizer needs the `sentencepiece` package '
          '(pip install sentencepiece).') from e
    self.model_path = os.fspath(model_path)
    self.extra_ids = extra_ids
    # From its bytes: the model may be local or on gs:// (storage.py).
    proto = storage.read_bytes(self.model_path)
    self._sp = sentencepiece.SentencePieceProcessor()
    try:
      self._sp.LoadFromSerializedProto(proto)
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f'{self.model_path}: not a SentencePiece model ({e})') from None
    # T5 reserves 0/1/2 for pad/eos/unk; a model trained otherwise would make
    # our padding collide with a real piece.
    got = (self._sp.pad_id(), self._sp.eos_id(), self._sp.unk_id())
    if got != (PAD_ID, EOS_ID, UNK_ID):
      raise ValueError(
          f'{self.model_path}: expected T5 ids pad/eos/unk = 0/1/2, '
          f'got {got[0]}/{got[1]}/{got[2]}')

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size() + self.extra_ids

  def _encode_pieces(self, text: str) -> list[int]:
    return list(self._sp.encode(text))

  def decode(self, ids: Sequence[int]) -> str:
    kept = []
    for i in np.asarray(ids).reshape(-1).tolist():
      if i == self.eos_id:
        break
      if i != self.pad_id and i < self._sp.get_piece_size():
        kept.append(i)
    return self._sp.decode(kept)
