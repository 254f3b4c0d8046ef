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
  # Exponential moving average of `params`: what evaluation and export use.
  ema_params: Any
  # The discriminator and its own optimizer ({} when the GAN is off), and
  # the moving averages of its (real, fake) logits for LeCam.
  disc_params: Any
  disc_opt_state: Any
  lecam_ema: jax.Array


@flax.struct.dataclass
class GeneratorState(TrainState):
  # Exponential moving average of `params` (the generator, and the text
  # encoder when it trains): what evaluation and sampling use.
  ema_params: Any
  # Consecutive skipped (non-finite) steps, as in TokenizerState.
  nonfinite_streak: jax.Array
