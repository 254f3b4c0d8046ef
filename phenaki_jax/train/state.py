"""The train state: a plain pytree of step, parameters and optimizer state."""
from __future__ import annotations

from typing import Any

import flax.struct
import jax


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


@flax.struct.dataclass
class TokenizerState(TrainState):
  # EMA of each code's share of tokens, for restarting dead codes.
  code_usage: jax.Array
  # Consecutive steps whose loss, gradients or update were not finite (and
  # were therefore skipped); kept on device so checking it needs no sync.
  nonfinite_streak: jax.Array
