"""Test-wide setup: 8 simulated CPU devices, so sharding tests see a real mesh."""
import os
import tempfile

# Must happen before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Many tests compile the same tiny programs (a resumed run recompiles its
# step; subprocess runs compile them again): XLA's persistent cache, shared
# with the subprocesses through the environment, compiles each once.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), f"phenaki_jax_test_xla_cache_{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")

import pytest  # noqa: E402
from absl import flags  # noqa: E402

# grain's multiprocessing reads absl flags; tests are not run under absl.app.
flags.FLAGS.mark_as_parsed()


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: longer than CI can afford; run with -m slow")
