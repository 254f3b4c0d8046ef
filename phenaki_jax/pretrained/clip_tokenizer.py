"""OpenAI CLIP's byte-level BPE tokenizer, for the CLIP text tower.

It reads the merges file OpenAI published, `bpe_simple_vocab_16e6.txt.gz`
(open_clip's pip package ships it as `open_clip/bpe_simple_vocab_16e6.txt.gz`;
`default_merges_path` finds it there without importing open_clip). The ids are
OpenAI's: 256 byte symbols, 256 end-of-word byte symbols, 48,894 merges, then
<|startoftext|> = 49406 and <|endoftext|> = 49407; padding is 0.

Text cleanup as OpenAI / open_clip ('lower' mode): ftfy.fix_text, HTML
unescaping twice, whitespace collapsed, lower case. Then the text is split
with OpenAI's pattern

    <|startoftext|>|<|endoftext|>|'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+

which needs the `regex` module for \\p{..}. Instead of depending on it, the
splitter below scans characters by Unicode category (unicodedata), which is the
same pattern written out by hand (checked against `regex` in the tests); the
one difference is the Unicode version: Python's unicodedata against the
`regex` module's tables, which only matters for characters added recently.

ftfy is used when installed (it repairs mojibake, uncurls quotes, expands
ligatures, narrows full-width characters, NFC-normalises). Without it only
NFC normalisation and quote uncurling are done, so captions with mojibake,
ligatures or full-width forms can get different ids than OpenAI's.
"""
from __future__ import annotations

import functools
import gzip
import html
import importlib.util
import os
import unicodedata
from typing import Optional, Sequence

import numpy as np

from phenaki_jax import storage

MERGES_FILENAME = 'bpe_simple_vocab_16e6.txt.gz'
SOT_TOKEN = '<|startoftext|>'
EOT_TOKEN = '<|endoftext|>'
PAD_ID = 0
_NUM_MERGES = 49152 - 256 - 2  # OpenAI keeps the first 48,894 merges
_CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")
_CURLY_QUOTES = str.maketrans({'\u2018': "'", '\u2019': "'", '\u201a': "'",
                               '\u201b': "'", '\u201c': '"', '\u201d': '"',
                               '\u201e': '"', '\u201f': '"'})

try:
  import ftfy  # pylint: disable=g-import-not-at-top
except ImportError:  # optional: see the module docstring
  ftfy = None


def default_merges_path() -> Optional[str]:
  """The merges file inside an installed open_clip package, or None.

  Found via the import system's metadata only: importing open_clip would
  pull in torch and torchvision.
  """
  spec = importlib.util.find_spec('open_clip')
  if spec is None or not spec.submodule_search_locations:
    return None
  for folder in spec.submodule_search_locations:
    path = os.path.join(folder, MERGES_FILENAME)
    if os.path.exists(path):
      return path
  return None


@functools.lru_cache(maxsize=None)
def bytes_to_unicode() -> dict[int, str]:
  """OpenAI/GPT-2's reversible byte -> printable character table."""
  printable = (list(range(ord('!'), ord('~') + 1)) +
               list(range(ord('\u00a1'), ord('\u00ac') + 1)) +
               list(range(ord('\u00ae'), ord('\u00ff') + 1)))
  table = {b: chr(b) for b in printable}
  extra = 0
  for b in range(256):
    if b not in table:
      table[b] = chr(256 + extra)
      extra += 1
  # Key order matters: it fixes the ids of the 512 byte symbols.
  return {b: table[b] for b in printable + [b for b in range(256)
                                            if b not in printable]}


def clean_text(text: str) -> str:
  """OpenAI's basic_clean + whitespace_clean + lower()."""
  if ftfy is not None:
    text = ftfy.fix_text(text)
  else:
    text = unicodedata.normalize('NFC', text).translate(_CURLY_QUOTES)
  text = html.unescape(html.unescape(text)).strip()
  return ' '.join(text.split()).strip().lower()


def _kind(char: str) -> str:
  """'L' letter, 'N' number, 'S' whitespace, 'O' anything else."""
  if char.isspace():
    return 'S'
  category = unicodedata.category(char)[0]
  return category if category in ('L', 'N') else 'O'


def split_words(text: str) -> list[str]:
  """OpenAI's regex split (see the module docstring), by character kinds."""
  pieces = []
  i, n = 0, len(text)
  while i < n:
    for special in (SOT_TOKEN, EOT_TOKEN):
      if text.startswith(special, i):
        pieces.append(special)
        i += len(special)
        break
    else:
      # Alternatives in the pattern's order: contractions come before the
      # punctuation run, which would otherwise take the apostrophe.
      contraction = next((c for c in _CONTRACTIONS
                          if text[i:i + len(c)].casefold() == c), None)
      if contraction is not None:
        pieces.append(text[i:i + len(contraction)])
        i += len(contraction)
        continue
      kind = _kind(text[i])
      if kind == 'S':  # whitespace matches no alternative: skipped
        i += 1
        continue
      j = i + 1
      if kind != 'N':  # [\p{N}] takes one digit at a time
        while j < n and _kind(text[j]) == kind:
          j += 1
      pieces.append(text[i:j])
      i = j
  return pieces


class CLIPTokenizer:
  """Text -> CLIP token ids: SOT, BPE pieces, EOT, zero padding.

  Attributes:
    context_length: default length of `encode_batch` rows (77 for CLIP).
    vocab_size: 49408 with OpenAI's merges file (512 + merges + 2).
    sot_id, eot_id: ids of <|startoftext|> and <|endoftext|>.
  """

  pad_id = PAD_ID

  def __init__(self, merges_path: Optional[str | os.PathLike[str]] = None,
               context_length: int = 77):
    if merges_path is None:
      merges_path = default_merges_path()
      if merges_path is None:
        raise FileNotFoundError(
            f'no CLIP merges file given and no installed open_clip to take '
            f'{MERGES_FILENAME} from; pass merges_path= (the file ships with '
            'the open_clip_torch and OpenAI CLIP packages)')
    merges_path = os.fspath(merges_path)
    try:
      lines = gzip.decompress(storage.read_bytes(merges_path)).decode('utf-8').split('\n')
    except (OSError, EOFError, UnicodeDecodeError) as e:
      if isinstance(e, storage.StorageError):
        raise
      raise ValueError(f'{merges_path}: not a gzipped CLIP merges file ({e})') from None
    # Line 0 is a version header; OpenAI uses the next 48,894 merges. A
    # shorter file (a test's, or a smaller vocabulary) gives fewer ids.
    merges = [tuple(line.split()) for line in lines[1:_NUM_MERGES + 1]
              if line.strip()]
    bad = next((i for i, m in enumerate(merges) if len(m) != 2), None)
    if not merges or bad is not None:
      where = (f' (line {bad + 2}: {lines[bad + 1]!r})' if bad is not None
               else '')
      raise ValueError(f'{merges_path}: not a CLIP merges file: expected a '
                       f'header line, then one "a b" pair per line{where}')
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + '</w>' for s in symbols]
    vocab += [''.join(m) for m in merges]
    vocab += [SOT_TOKEN, EOT_TOKEN]
    self.encoder = {token: i for i, token in enumerate(vocab)}
    self.decoder = dict(enumerate(vocab))
    self.bpe_ranks = {m: i for i, m in enumerate(merges)}
    self.byte_encoder = bytes_to_unicode()
    self.byte_decoder = {v: k for k, v in self.byte_encoder.items()}
    self.sot_id = self.encoder[SOT_TOKEN]
    self.eot_id = self.encoder[EOT_TOKEN]
    self.vocab_size = len(vocab)
    self.context_length = context_length
    self._cache: dict[str, tuple[str, ...]] = {}

  def _bpe(self, word: str) -> tuple[str, ...]:
    """BPE of one (byte-encoded) word; the last symbol carries '</w>'."""
    if word in self._cache:
      return self._cache[word]
    symbols = list(word[:-1]) + [word[-1] + '</w>']
    while len(symbols) > 1:
      # The lowest-ranked adjacent pair is merged everywhere it occurs.
      pairs = {(a, b) for a, b in zip(symbols, symbols[1:])}
      best = min(pairs, key=lambda p: self.bpe_ranks.get(p, float('inf')))
      if best not in self.bpe_ranks:
        break
      merged, i = [], 0
      while i < len(symbols):
        if (i < len(symbols) - 1 and symbols[i] == best[0] and
            symbols[i + 1] == best[1]):
          merged.append(best[0] + best[1])
          i += 2
        else:
          merged.append(symbols[i])
          i += 1
      symbols = merged
    result = tuple(symbols)
    self._cache[word] = result
    return result

  def encode(self, text: str) -> list[int]:
    """BPE ids of `text`, without SOT/EOT."""
    ids = []
    for word in split_words(clean_text(text)):
      if word in (SOT_TOKEN, EOT_TOKEN):
        # OpenAI's pattern matches these literally and maps them to their
        # special ids (its cache is seeded with them).
        ids.append(self.encoder[word])
        continue
      encoded = ''.join(self.byte_encoder[b] for b in word.encode('utf-8'))
      ids.extend(self.encoder[piece] for piece in self._bpe(encoded))
    return ids

  def decode(self, ids: Sequence[int]) -> str:
    """Text of `ids` (special and padding ids dropped)."""
    skip = {self.sot_id, self.eot_id, self.pad_id}
    text = ''.join(self.decoder[int(i)] for i in ids if int(i) not in skip)
    raw = bytearray(self.byte_decoder[c] for c in text)
    return raw.decode('utf-8', errors='replace').replace('</w>', ' ').strip()

  def encode_batch(self, texts: Sequence[str],
                   context_length: Optional[int] = None) -> np.ndarray:
    """int32 [len(texts), context_length]: SOT, ids, EOT, then 0s.

    A text longer than the context is cut and its last token replaced by EOT,
    as OpenAI's `tokenize(truncate=True)` and open_clip do, so the text tower
    always pools at an EOT.
    """
    if isinstance(texts, str):
      raise TypeError('encode_batch takes a sequence of strings, not a str')
    length = context_length or self.context_length
    if length < 2:
      raise ValueError(f'context_length must be >= 2, got {length}')
    out = np.full((len(texts), length), self.pad_id, np.int32)
    for row, text in enumerate(texts):
      ids = [self.sot_id] + self.encode(text) + [self.eot_id]
      if len(ids) > length:
        ids = ids[:length]
        ids[-1] = self.eot_id
      out[row, :len(ids)] = ids
    return out
