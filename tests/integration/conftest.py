"""Fixtures of the integration tests."""
import types

import pytest

from phenaki_jax.train import train_cvivit
from tests.integration.fault_runs import TOKENIZER_ARGS, tokenizer_config


@pytest.fixture(scope="session")
def uninterrupted_tokenizer(tmp_path_factory):
  """fault_runs.TOKENIZER_ARGS run whole in a local workdir, once per session.

  In-process: on the same 8 simulated devices its per-step losses are bitwise
  those of `python -m phenaki_jax.main` with TOKENIZER_ARGS.
  """
  workdir = str(tmp_path_factory.mktemp("uninterrupted_tokenizer"))
  train_cvivit.train_and_evaluate(tokenizer_config(), workdir)
  return types.SimpleNamespace(workdir=workdir, args=list(TOKENIZER_ARGS))
