"""Shared by the sampling tests: a `:tiny` tokenizer and generator, trained once."""
import pytest

from phenaki_jax.generator import Generator
from phenaki_jax.train import train_cvivit, train_maskgit
from tests.helpers import load_config


@pytest.fixture(scope="package")
def trained(tmp_path_factory):
  """(tokenizer workdir, generator workdir): both `:tiny`, a few steps."""
  tok_dir = str(tmp_path_factory.mktemp("tokenizer"))
  config = load_config("cvivit", "tiny,l2vq")
  config.total_steps, config.checkpoint_every_steps, config.eval_every_steps = 1, 1, 0
  train_cvivit.train_and_evaluate(config, tok_dir)
  gen_dir = str(tmp_path_factory.mktemp("generator"))
  config = load_config("maskgit", "tiny")
  config.tokenizer.workdir = tok_dir
  config.total_steps, config.eval_every_steps = 3, 0
  train_maskgit.train_and_evaluate(config, gen_dir)
  return tok_dir, gen_dir


@pytest.fixture(scope="package")
def generator(trained):
  return Generator.load(trained[1])


@pytest.fixture(scope="package")
def memory_trained(trained, tmp_path_factory):
  """A `:tiny` generator with long-term memory (model.memory_token_frames=1), same tokenizer."""
  gen_dir = str(tmp_path_factory.mktemp("memory_generator"))
  config = load_config("maskgit", "tiny")
  config.tokenizer.workdir = trained[0]
  config.model.memory_token_frames = 1
  config.total_steps, config.eval_every_steps = 3, 0
  train_maskgit.train_and_evaluate(config, gen_dir)
  return gen_dir


@pytest.fixture(scope="package")
def memory_generator(memory_trained):
  return Generator.load(memory_trained)
