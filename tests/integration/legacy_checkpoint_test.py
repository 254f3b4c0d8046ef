"""Checkpoints written before the package restructure still restore and sample the same.

tests/data/legacy_checkpoints (see its README) holds a `configs/cvivit.py:tiny`
tokenizer and a `configs/maskgit.py:tiny` generator trained by the code of
2026-12-01 before issue 22, with the tokenizer's codes of fixed frames and the
tokens the generator sampled then. Inference loads the weights only; a
resumed run restores the whole train state (optimizer, discriminator, EMA,
data position) as the trainers build it, so a renamed module or state field
fails here.
"""
import json
import os
import shutil

import jax
import ml_collections
import numpy as np

from phenaki_jax import checkpointing, optimizers, sharding, train_state
from phenaki_jax.config import schema
from phenaki_jax.data import pipeline
from phenaki_jax.generator import Generator, SamplingOptions
from phenaki_jax.text.encoder import build_text_encoder
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


def _restore_train_state(workdir, build):
  """What a resumed trainer restores: the newest step, on the trainer's abstract state."""
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=3,
                                    async_save=False)
  config = schema.complete(ml_collections.ConfigDict(ckpt.restore_config(6)))
  mesh = sharding.make_mesh((1, 1, 1), jax.local_devices()[:1])
  with sharding.use_mesh(mesh, config.logical_axis_rules):
    tx = optimizers.make_optimizer(config.optimizer, config.total_steps)
    abstract, shardings, _ = build(config, tx, mesh)
  data = iter(pipeline.make_train_dataset(config.input, seed=config.seed, process_index=0,
                                          process_count=1, **(
      {"keep_caption": True, "text_max_length": config.text.max_length}
      if config.job == "maskgit" else {})))
  state, step = ckpt.restore_latest(checkpointing.abstract_with_shardings(abstract, shardings),
                                    data, config)
  ckpt.close()
  return state, step


def test_legacy_train_states_restore_for_resuming(tmp_path):
  tok_dir, gen_dir = _copy(tmp_path)
  state, step = _restore_train_state(tok_dir, lambda c, tx, mesh: train_state.cvivit_abstract_state(
      c, train_state.build_cvivit(c), tx, mesh))
  assert step == 6 and int(state.step) == 6 and state.disc_params  # the tiny GAN was on
  assert jax.tree.leaves(state.opt_state)
  state, step = _restore_train_state(gen_dir, lambda c, tx, mesh: train_state.maskgit_abstract_state(
      c, train_state.build_maskgit(c), build_text_encoder(c.text), tx, mesh))
  assert step == 6 and int(state.step) == 6 and "text_encoder" in state.params
