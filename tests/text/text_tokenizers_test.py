"""text/text_tokenizers.py: the byte tokenizer and the SentencePiece tokenizer
(vs sentencepiece itself and Hugging Face's T5Tokenizer when installed).
"""
import shutil

import numpy as np
import pytest

from phenaki_jax.text import text_tokenizers
from tests.helpers import train_sentencepiece


def test_byte_tokenizer():
  tok = text_tokenizers.ByteTokenizer()
  assert tok.vocab_size == 259
  assert tok.encode('hi') == [ord('h') + 3, ord('i') + 3, 1]
  text = 'héllo, 世界 🎬'
  assert tok.decode(tok.encode(text)) == text

  ids, mask = tok.encode_batch(['hi', 'abcdefgh', ''], max_length=5)
  assert ids.dtype == np.int32 and ids.shape == (3, 5)
  np.testing.assert_array_equal(ids[0], [107, 108, 1, 0, 0])
  # Truncated, but still ends in EOS.
  np.testing.assert_array_equal(ids[1], [100, 101, 102, 103, 1])
  np.testing.assert_array_equal(ids[2], [1, 0, 0, 0, 0])
  np.testing.assert_array_equal(mask, ids != 0)
  # A multi-byte character cut by truncation is dropped, not mangled.
  ids, _ = tok.encode_batch(['a世'], max_length=3)
  assert tok.decode(ids[0]) == 'a'


def test_sentencepiece_tokenizer(tmp_path):
  model_path, sentences, spm = train_sentencepiece(tmp_path)
  tok = text_tokenizers.SentencePieceTokenizer(model_path)
  assert tok.vocab_size == 100 + 100
  raw = spm.SentencePieceProcessor(model_file=model_path)
  texts = sentences[:4] + ['zulo xyz!', '']
  for text in texts:
    assert tok.encode(text) == raw.encode(text) + [1]

  max_length = 12
  ids, mask = tok.encode_batch(texts, max_length)
  for row, text in enumerate(texts):
    want = raw.encode(text)[:max_length - 1] + [1]
    np.testing.assert_array_equal(ids[row, :len(want)], want)
    assert (ids[row, len(want):] == 0).all()
    assert mask[row].sum() == len(want)
  assert tok.decode(ids[0]) == raw.decode(raw.encode(texts[0])[:11])

  transformers = pytest.importorskip('transformers')
  hf_dir = tmp_path / 'hf'
  hf_dir.mkdir()
  shutil.copy(model_path, hf_dir / 'spiece.model')
  hf_tok = transformers.T5Tokenizer.from_pretrained(hf_dir)
  for text in texts:
    assert tok.encode(text) == hf_tok(text).input_ids


def test_sentencepiece_rejects_non_t5_ids(tmp_path):
  # sentencepiece's own defaults: unk 0, bos 1, eos 2, no pad.
  model_path, _, _ = train_sentencepiece(tmp_path, unk_id=0, bos_id=1,
                                          eos_id=2, pad_id=-1)
  with pytest.raises(ValueError, match='pad/eos/unk = 0/1/2'):
    text_tokenizers.SentencePieceTokenizer(model_path)

