"""Test-wide setup: 8 simulated CPU devices, so sharding tests see a real mesh."""
import os
import tempfile

# Must happen before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Before numpy loads: OpenBLAS's threads make FVD's 400x400 eigendecompositions
# seconds instead of tens of milliseconds on a 2-core machine that is busy.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
# Many tests compile the same tiny programs (a resumed run recompiles its
# step; subprocess runs compile them again): XLA's persistent cache, shared
# with the subprocesses through the environment, compiles each once.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), f"phenaki_jax_test_xla_cache_{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")

import pytest  # noqa: E402
from absl import flags  # noqa: E402

from phenaki_jax.generator import Generator  # noqa: E402
from phenaki_jax.train import train_cvivit, train_maskgit  # noqa: E402
from tests.helpers import load_config  # noqa: E402

# grain's multiprocessing reads absl flags; tests are not run under absl.app.
flags.FLAGS.mark_as_parsed()


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: longer than CI can afford; run with -m slow")


# --- A real GCS-protocol server (tests/gcs_emulator.py), one per session.

@pytest.fixture(scope="session")
def gcs_emulator():
  from tests.gcs_emulator import GcsEmulator
  emulator = GcsEmulator().start()
  yield emulator
  emulator.stop()


@pytest.fixture
def bucket(gcs_emulator):
  """A fresh, empty bucket on the emulator: 'gs://NAME'."""
  return gcs_emulator.create_bucket()


# --- A `:tiny` tokenizer and generators, trained once per session (sampling, eval tests).

@pytest.fixture(scope="session")
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


@pytest.fixture(scope="session")
def generator(trained):
  return Generator.load(trained[1])


@pytest.fixture(scope="session")
def memory_trained(trained, tmp_path_factory):
  """A `:tiny` generator with long-term memory (model.memory_token_frames=1), same tokenizer."""
  gen_dir = str(tmp_path_factory.mktemp("memory_generator"))
  config = load_config("maskgit", "tiny")
  config.tokenizer.workdir = trained[0]
  config.model.memory_token_frames = 1
  config.total_steps, config.eval_every_steps = 3, 0
  train_maskgit.train_and_evaluate(config, gen_dir)
  return gen_dir


@pytest.fixture(scope="session")
def memory_generator(memory_trained):
  return Generator.load(memory_trained)
