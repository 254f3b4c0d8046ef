"""Checkpoints written before the package restructure still restore and sample the same.

tests/data/legacy_checkpoints (see its README) holds a `configs/cvivit.py:tiny`
tokenizer and a `configs/maskgit.py:tiny` generator trained by the code of
2026-12-01 before issue 22, with the tokenizer's codes of fixed frames and the
tokens the generator sampled then. Loading restores the whole train state
(optimizer, discriminator, EMA), so a renamed module or state field fails here.
"""
import json
import os
import shutil

import numpy as np

from phenaki_jax.generator import Generator, SamplingOptions
from phenaki_jax.tokenizer import Tokenizer

LEGACY = os.path.join(os.path.dirname(__file__), "..", "data", "legacy_checkpoints")
PROMPTS = ["a small red circle moves left", "a large blue square moves up"]


def _copy(tmp_path):
  tok_dir, gen_dir = str(tmp_path / "tokenizer"), str(tmp_path / "generator")
  shutil.copytree(os.path.join(LEGACY, "tokenizer"), tok_dir)
  shutil.copytree(os.path.join(LEGACY, "generator"), gen_dir)
  record_path = os.path.join(gen_dir, "tokenizer.json")
  with open(record_path) as f:
    record = json.load(f)
  record["workdir"] = tok_dir
  with open(record_path, "w") as f:
    json.dump(record, f)
  return tok_dir, gen_dir


def test_legacy_checkpoints_restore_and_sample_the_same_tokens(tmp_path):
  expected = np.load(os.path.join(LEGACY, "expected.npz"))
  tok_dir, gen_dir = _copy(tmp_path)
  tok = Tokenizer.load(tok_dir)
  assert tok.step == 6
  np.testing.assert_array_equal(np.asarray(tok.encode(expected["frames"])), expected["codes"])
  gen = Generator.load(gen_dir)  # the tokenizer through the generator's record
  assert gen.step == 6 and gen.tokenizer.step == 6
  tokens = gen.sample_tokens(PROMPTS, seed=3, options=SamplingOptions(num_steps=4))
  np.testing.assert_array_equal(tokens, expected["tokens"])
