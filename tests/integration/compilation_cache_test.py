"""perf.setup_compilation_cache: a second process hits XLA's persistent cache.

(Moved from tests/models/fast_paths_test.py: it runs a subprocess. The
off-by-default check rides along with it; phenaki_jax/perf.py has no unit
test file of its own.)
"""
import os
import subprocess
import sys
import textwrap

from phenaki_jax import perf
from tests.helpers import REPO

_CACHE_SCRIPT = textwrap.dedent("""
    import sys
    import jax, jax.numpy as jnp
    from jax import monitoring
    from phenaki_jax import perf
    hits = []
    monitoring.register_event_listener(
        lambda name, **kw: hits.append(name) if name == '/jax/compilation_cache/cache_hits' else None)
    perf.setup_compilation_cache(sys.argv[1])
    f = jax.jit(lambda x: jnp.tanh(x @ x.T).sum() * 3.25 + 17.0)
    f(jnp.ones((24, 24))).block_until_ready()
    print('HITS', len(hits))
""")


def test_a_second_process_hits_the_compilation_cache(tmp_path):
  repo = str(REPO)
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
  env["PYTHONPATH"] = repo
  cache = str(tmp_path / "xla_cache")

  def run():
    out = subprocess.run([sys.executable, "-c", _CACHE_SCRIPT, cache], env=env, cwd=repo,
                         capture_output=True, text=True, timeout=120, check=True)
    return int(out.stdout.split("HITS")[-1])

  assert run() == 0
  assert os.listdir(cache), "nothing was written to the cache"
  assert run() >= 1


def test_compilation_cache_off_by_default():
  assert perf.setup_compilation_cache("") is None
