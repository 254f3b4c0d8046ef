"""Python API of a trained C-ViViT: load a checkpoint, encode and decode clips.

  from phenaki_jax.tokenizer import Tokenizer
  tok = Tokenizer.load("runs/cvivit")          # newest good checkpoint, EMA weights
  codes = tok.encode(frames)                   # uint8 (B, T, H, W, 3) -> int32 (B, 1+k, h, w)
  video = tok.decode(codes)                    # -> float32 (B, 1+k·t_p, H, W, 3) in [-1, 1]
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from phenaki_jax import checkpointing, optimizers, sharding
from phenaki_jax.config import schema
from phenaki_jax.models import cvivit


@dataclasses.dataclass
class Tokenizer:
  """A C-ViViT with its parameters, on the default device."""
  model: cvivit.CViViT
  params: Any
  config: ml_collections.ConfigDict
  step: int

  @classmethod
  def load(cls, workdir: str, step: int | None = None, use_ema: bool = True) -> "Tokenizer":
    """Restores params from `workdir/checkpoints` (the newest good step by default).

    `use_ema` takes the exponential moving average of the weights, which
    evaluation uses too; False takes the last step's raw weights.
    """
    ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=1000,
                                      async_save=False)
    steps = ckpt.all_steps()
    if not steps:
      raise FileNotFoundError(f"no C-ViViT checkpoint in {workdir}/checkpoints")
    config_step = step if step is not None else steps[-1]
    config = schema.complete(ml_collections.ConfigDict(ckpt.restore_config(config_step)))
    # Imported here: the trainer module pulls in the input pipeline.
    from phenaki_jax.train import train_cvivit  # pylint: disable=g-import-not-at-top
    model = train_cvivit.build_model(config)
    tx = optimizers.make_optimizer(config.optimizer, config.total_steps)
    # This process's own first device: on a multi-host job jax.devices()[0]
    # belongs to process 0.
    mesh = sharding.make_mesh((1, 1, 1), jax.local_devices()[:1])
    with sharding.use_mesh(mesh, config.logical_axis_rules):
      abstract, shardings, _ = train_cvivit.abstract_state_and_shardings(config, model, tx, mesh)
    target = checkpointing.abstract_with_shardings(abstract, shardings)
    if step is None:
      state, step = ckpt.restore_latest(target)
    else:
      state = ckpt.restore(step, target)
    ckpt.close()
    return cls(model=model, params=state.ema_params if use_ema else state.params, config=config,
               step=int(step))

  def __post_init__(self):
    self._encode = jax.jit(lambda p, v: self.model.apply({"params": p}, v,
                                                         method=self.model.encode)[1]["codes"])
    self._decode = jax.jit(lambda p, c: self.model.apply({"params": p}, c,
                                                         method=self.model.decode))

  @staticmethod
  def _as_float(frames: Any) -> jax.Array:
    frames = np.asarray(frames)
    if frames.dtype == np.uint8:
      return jnp.asarray(frames, jnp.float32) / 127.5 - 1.0
    return jnp.asarray(frames, jnp.float32)

  def encode(self, frames: Any) -> jax.Array:
    """uint8 [0, 255] or float [-1, 1] frames (B, T, H, W, 3) -> codes (B, 1+k, h, w)."""
    return self._encode(self.params, self._as_float(frames))

  def decode(self, codes: Any) -> jax.Array:
    """Codes (B, 1+k, h, w) -> float frames (B, 1+k·t_p, H, W, 3) in [-1, 1]."""
    return jnp.clip(self._decode(self.params, jnp.asarray(codes, jnp.int32)), -1.0, 1.0)

  def reconstruct(self, frames: Any) -> jax.Array:
    return self.decode(self.encode(frames))
