"""tokenizer.py: the generator/tokenizer match check, the tokenizer record, which step
to load, and Tokenizer.load (EMA or raw weights, weights only, a missing step).

Tokenizer.load reads a copy of the `configs/cvivit.py:tiny` checkpoint under
tests/data/legacy_checkpoints/tokenizer (step 6, with its optimizer and GAN state).
"""
import dataclasses
import json
import os
import shutil
import types

import jax
import numpy as np
import pytest

from phenaki_jax import checkpointing, placement, sharding
from phenaki_jax import tokenizer as tokenizer_lib
from phenaki_jax.config.schema import ConfigError
from phenaki_jax.tokenizer import Tokenizer
from tests.helpers import REPO, load_config

LEGACY_TOKENIZER = REPO / "tests" / "data" / "legacy_checkpoints" / "tokenizer"


# --- check_tokenizer_match.

def _configs():
  """(generator config, tokenizer config): `:tiny` both, matching (64 codes, 16px, 3x4x4)."""
  return load_config("maskgit", "tiny"), load_config("cvivit", "tiny")


def _mismatch(config, tok_config):
  with pytest.raises(ConfigError) as err:
    tokenizer_lib.check_tokenizer_match(config, tok_config, "/runs/tok")
  msg = str(err.value)
  assert msg.startswith("the generator config does not match the tokenizer in /runs/tok: ")
  return msg


def test_matching_configs_pass():
  config, tok_config = _configs()
  tokenizer_lib.check_tokenizer_match(config, tok_config, "/runs/tok")
  assert tokenizer_lib.token_grid_for(tok_config, 5, 16) == tuple(config.model.token_grid)


def test_a_codebook_size_mismatch_names_the_key():
  config, tok_config = _configs()
  config.model.codebook_size = 128
  msg = _mismatch(config, tok_config)
  assert "config.model.codebook_size=128 but the tokenizer has 64 codes" in msg
  assert "set config.model.codebook_size=64" in msg


def test_a_resolution_mismatch_names_the_key():
  config, tok_config = _configs()
  config.input.resolution = 32
  msg = _mismatch(config, tok_config)
  assert "config.input.resolution=32 but the tokenizer was built for 16px frames" in msg


def test_a_token_grid_mismatch_names_the_key_and_the_grid_to_set():
  config, tok_config = _configs()
  config.model.token_grid = (3, 2, 2)
  msg = _mismatch(config, tok_config)
  assert "config.model.token_grid=(3, 2, 2)" in msg
  assert "set config.model.token_grid=(3, 4, 4)" in msg


def test_frames_the_tokenizer_cannot_take_name_the_key():
  config, tok_config = _configs()
  config.input.num_frames = 4  # not 1 + k·2
  assert "config.input.num_frames=4" in _mismatch(config, tok_config)


def test_every_mismatch_is_named_in_one_error():
  config, tok_config = _configs()
  config.model.codebook_size = 128
  config.model.token_grid = (2, 4, 4)
  msg = _mismatch(config, tok_config)
  assert "config.model.codebook_size=128" in msg and "config.model.token_grid=(2, 4, 4)" in msg


# --- The tokenizer record and the step to load.

def _tok_workdir(tmp_path, steps):
  """A workdir whose checkpoints/ holds finalised step folders (all the step choice reads)."""
  tok_dir = tmp_path / "tokenizer"
  for s in steps:
    (tok_dir / "checkpoints" / str(s)).mkdir(parents=True)
  return str(tok_dir)


def _gen_config(tok_dir, step=-1):
  config = load_config("maskgit", "tiny")
  config.tokenizer.workdir, config.tokenizer.step = tok_dir, step
  return config


def test_record_round_trip(tmp_path):
  gen_dir = tmp_path / "generator"
  gen_dir.mkdir()
  assert tokenizer_lib.read_record(str(gen_dir)) is None
  tok = types.SimpleNamespace(step=np.int64(6), config=load_config("cvivit", "tiny"))
  config = _gen_config(os.path.relpath(_tok_workdir(tmp_path, [6])))
  tokenizer_lib.write_record(config, str(gen_dir), tok)
  record = tokenizer_lib.read_record(str(gen_dir))
  assert record == {"workdir": str(tmp_path / "tokenizer"), "step": 6, "codebook_size": 64}
  with open(gen_dir / tokenizer_lib.TOKENIZER_RECORD) as f:
    assert json.load(f) == record


def test_a_pinned_step_is_loaded_and_must_exist(tmp_path):
  tok_dir, gen_dir = _tok_workdir(tmp_path, [2, 4]), str(tmp_path)
  assert tokenizer_lib.tokenizer_step_to_load(_gen_config(tok_dir, step=2), gen_dir) == 2
  with pytest.raises(ConfigError, match=r"config.tokenizer.step=3: .* has checkpoint steps \[2, 4\]"):
    tokenizer_lib.tokenizer_step_to_load(_gen_config(tok_dir, step=3), gen_dir)


def _write_record(gen_dir, tok_dir, step):
  with open(os.path.join(gen_dir, tokenizer_lib.TOKENIZER_RECORD), "w") as f:
    json.dump({"workdir": tok_dir, "step": step, "codebook_size": 64}, f)


def test_the_recorded_step_is_loaded_again(tmp_path):
  tok_dir = _tok_workdir(tmp_path, [2, 4])
  gen_dir = tmp_path / "generator"
  gen_dir.mkdir()
  # No record yet: the newest step (None).
  assert tokenizer_lib.tokenizer_step_to_load(_gen_config(tok_dir), str(gen_dir)) is None
  _write_record(str(gen_dir), tok_dir, 2)
  assert tokenizer_lib.tokenizer_step_to_load(_gen_config(tok_dir), str(gen_dir)) == 2
  # A pinned step wins over the record.
  assert tokenizer_lib.tokenizer_step_to_load(_gen_config(tok_dir, step=4), str(gen_dir)) == 4
  # A record of another tokenizer workdir does not apply.
  _write_record(str(gen_dir), str(tmp_path / "elsewhere"), 2)
  assert tokenizer_lib.tokenizer_step_to_load(_gen_config(tok_dir), str(gen_dir)) is None


def test_a_recorded_step_the_workdir_no_longer_has_is_an_error_naming_it(tmp_path):
  tok_dir = _tok_workdir(tmp_path, [4, 6])
  gen_dir = tmp_path / "generator"
  gen_dir.mkdir()
  _write_record(str(gen_dir), tok_dir, 2)
  with pytest.raises(ConfigError) as err:
    tokenizer_lib.tokenizer_step_to_load(_gen_config(tok_dir), str(gen_dir))
  msg = str(err.value)
  assert "this run trained on tokenizer step 2" in msg
  assert str(gen_dir / tokenizer_lib.TOKENIZER_RECORD) in msg
  assert "(it has [4, 6])" in msg and "config.tokenizer.step" in msg


def test_a_tokenizer_workdir_without_checkpoints_is_an_error(tmp_path):
  with pytest.raises(ConfigError, match=r"config.tokenizer.workdir=.*no C-ViViT checkpoint"):
    tokenizer_lib.tokenizer_step_to_load(_gen_config(str(tmp_path / "none")), str(tmp_path))


# --- Tokenizer.load.

@pytest.fixture
def legacy_tokenizer(tmp_path):
  """A copy (orbax may tidy the folder it opens) of the legacy `:tiny` tokenizer, step 6."""
  tok_dir = str(tmp_path / "tokenizer")
  shutil.copytree(LEGACY_TOKENIZER, tok_dir)
  return tok_dir


@pytest.fixture
def restores(monkeypatch):
  """Every checkpoint read Tokenizer.load makes: (step, target, partial).

  Checkpointer.restore and restore_latest both read through _restore_here.
  """
  calls, restore = [], checkpointing.Checkpointer._restore_here  # pylint: disable=protected-access

  def spy(self, step, abstract_state, data_iterator, partial):
    calls.append((step, abstract_state, partial))
    return restore(self, step, abstract_state, data_iterator, partial)

  monkeypatch.setattr(checkpointing.Checkpointer, "_restore_here", spy)
  return calls


def _keys(tree):
  return {getattr(k, "key", getattr(k, "name", None)) for path, _ in
          jax.tree_util.tree_flatten_with_path(tree)[0] for k in path}


def test_load_restores_the_weights_only(legacy_tokenizer, restores):
  tok = Tokenizer.load(legacy_tokenizer)
  assert tok.step == 6
  # One partial restore of the EMA weights: no optimizer, no discriminator read.
  assert [(step, list(target), partial) for step, target, partial in restores] == [
      (6, ["ema_params"], True)]
  assert [f.name for f in dataclasses.fields(tok)] == ["model", "params", "config", "step",
                                                       "placement"]
  # By default on all of this process's devices, in the run's mesh shape (-1, 1, 1).
  assert tok.mesh.devices.size == len(jax.local_devices()) == 8
  want = placement.abstract_on(tokenizer_lib.cvivit_abstract_boxed(tok.config, tok.model),
                               tok.placement)
  assert jax.tree.structure(tok.params) == jax.tree.structure(want)
  assert jax.tree.map(lambda x: (x.shape, x.dtype), tok.params) == jax.tree.map(
      lambda x: (x.shape, x.dtype), want)
  # The checkpoint holds optimizer and GAN state; none of it came back.
  assert not _keys(tok.params) & {"opt_state", "mu", "nu", "count", "disc_params",
                                  "disc_opt_state", "ema_params", "params"}
  assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(tok.params))


def _mesh(shape):
  return sharding.make_mesh(shape, jax.devices()[:int(np.prod(shape))])


def test_load_onto_a_mesh_with_model_axes_gives_the_one_device_codes_and_frames(
    legacy_tokenizer, restores):
  """The weights restored straight into their shards (fsdp and tensor by the rules, or
  whole when they do not split); the same codes and frames as on one device, for a
  batch of 3 that the 4 batch shards of (2,2,2) split only once padded."""
  frames = np.random.default_rng(0).integers(0, 256, (3, 5, 16, 16, 3), np.uint8)
  one = Tokenizer.load(legacy_tokenizer, mesh=_mesh((1, 1, 1)))
  codes = np.asarray(one.encode(frames))
  video = np.asarray(one.decode(codes))
  for shape, layout in (((2, 2, 2), "rules"), ((1, 1, 8), "whole")):
    tok = Tokenizer.load(legacy_tokenizer, mesh=_mesh(shape))
    assert tuple(tok.mesh.shape.values()) == shape
    specs = {tuple(x.sharding.spec) for x in jax.tree.leaves(tok.params)}
    if layout == "rules":  # split by fsdp ('embed') and tensor ('heads', 'mlp')
      assert tok.placement.batch_ways == 4
      assert any("fsdp" in s for s in specs) and any("tensor" in s for s in specs)
    else:  # its 2 heads do not split 8 ways: whole weights, the batch split over data only
      assert tok.placement.batch_ways == 1
      assert all(x.sharding.is_fully_replicated for x in jax.tree.leaves(tok.params))
    got = tok.encode(frames)
    assert got.shape == codes.shape and got.sharding.is_fully_replicated
    np.testing.assert_array_equal(np.asarray(got), codes)
    np.testing.assert_allclose(np.asarray(tok.decode(codes)), video, atol=1e-5)
    if layout == "rules":  # one more compilation: on one mesh only
      recon, recon_codes = tok.reconstruct_with_codes(frames)
      np.testing.assert_array_equal(np.asarray(recon_codes), codes)
      np.testing.assert_allclose(np.asarray(recon), video, atol=1e-5)
  # Every load read the EMA weights only.
  assert [list(target) for _, target, _ in restores] == [["ema_params"]] * 3


def test_load_takes_the_ema_or_the_raw_weights(legacy_tokenizer, restores):
  ema = Tokenizer.load(legacy_tokenizer)
  raw = Tokenizer.load(legacy_tokenizer, use_ema=False)
  assert [list(target) for _, target, _ in restores] == [["ema_params"], ["params"]]
  assert jax.tree.structure(ema.params) == jax.tree.structure(raw.params)
  differ = jax.tree.leaves(jax.tree.map(
      lambda a, b: not np.array_equal(np.asarray(a), np.asarray(b)), ema.params, raw.params))
  assert all(differ)  # six steps of EMA: every leaf differs from the raw weights
  # A pinned step restores the same weights as the newest (it is the only one).
  pinned = Tokenizer.load(legacy_tokenizer, step=6)
  jax.tree.map(np.testing.assert_array_equal, pinned.params, ema.params)


def test_load_of_a_missing_step_names_it(legacy_tokenizer):
  with pytest.raises(FileNotFoundError, match=r"checkpoint step 5 not found in .*tokenizer/"
                                              r"checkpoints \(it has steps \[6\]\)"):
    Tokenizer.load(legacy_tokenizer, step=5)


def test_load_without_checkpoints_names_the_workdir(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"no C-ViViT checkpoint in .*empty/checkpoints"):
    Tokenizer.load(str(tmp_path / "empty"))


# --- Several processes: all load the step process 0 chose, and check its record.

def test_other_processes_check_the_record_names_their_step_in_a_shared_workdir(tmp_path):
  gen_dir = tmp_path / "generator"
  gen_dir.mkdir()
  tok_dir = _tok_workdir(tmp_path, [6])
  config, tok = _gen_config(tok_dir), types.SimpleNamespace(step=6)
  # No record: this process's workdir is not the one process 0 wrote to.
  with pytest.raises(RuntimeError, match=r"loaded tokenizer .* step 6 but .*generator/"
                                         r"tokenizer.json holds nothing .* same --workdir"):
    tokenizer_lib.check_record(config, str(gen_dir), tok)
  for other in ((str(tmp_path / "elsewhere"), 6), (tok_dir, 4)):
    _write_record(str(gen_dir), *other)
    with pytest.raises(RuntimeError, match="every process needs the same --workdir"):
      tokenizer_lib.check_record(config, str(gen_dir), tok)
  _write_record(str(gen_dir), tok_dir, 6)
  tokenizer_lib.check_record(config, str(gen_dir), tok)


def test_load_up_to_the_newest_step_process_0_saw(legacy_tokenizer):
  # Step 8 appears after process 0 listed the steps (the tokenizer's run still saving).
  checkpoints = os.path.join(legacy_tokenizer, "checkpoints")
  shutil.copytree(os.path.join(checkpoints, "6"), os.path.join(checkpoints, "8"))
  assert Tokenizer.load(legacy_tokenizer, newest=6).step == 6
  assert Tokenizer.load(legacy_tokenizer).step == 8
