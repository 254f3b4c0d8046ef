"""The MaskGIT generator's sections: its model, its training tasks (masks, prefix, memory), its loss.

Also `ref_defaults`: which trained generator a later job (sampling,
generated-video evaluation) loads.
"""
from __future__ import annotations

import ml_collections

from phenaki_jax.config import compute
from phenaki_jax.config import errors
from phenaki_jax.config import sampling
from phenaki_jax.config import sizes

# The sizes; a trainer checks them with its other positive keys first.
POSITIVE_KEYS = tuple(f"model.{k}" for k in (
    "codebook_size", "width", "num_layers", "num_heads", "head_dim", "mlp_dim"))


def model_defaults() -> ml_collections.ConfigDict:
  """`model.*`: the default size on the default tokenizer's tokens, and how it computes."""
  c = ml_collections.ConfigDict()
  # What the generator is built for (codebook_size; token_grid: (token frames,
  # h, w) of an input.num_frames clip); checked against the tokenizer at start.
  c.update(sizes.generator_size("default"))
  c.update(compute.defaults())
  # Long-term memory for stories (experimental; benchmarks/RESULTS.md): this many
  # token frames of a story's first window join the text in cross-attention
  # (StreamingT2V's appearance preservation, as tokens); 0: off, no parameters.
  c.memory_token_frames = 0
  return c


def task_defaults() -> ml_collections.ConfigDict:
  """The training tasks: top-level text_drop_rate, mask_schedule; prefix.*, memory.*."""
  c = ml_collections.ConfigDict()
  # Classifier-free guidance: this fraction of examples (drawn per example
  # and step) sees the empty text, which trains the unconditional model.
  c.text_drop_rate = 0.1
  # γ(r) of the training masks, r ~ U(0, 1) per example (sampling.MASK_SCHEDULES).
  c.mask_schedule = "cosine"
  # The story task: with this probability an example's first k token frames
  # (k ~ U{1..t-1}) are given unmasked, as a story's re-encoded context is at
  # sampling time, and the loss is on the rest; corrupt_fraction of those
  # context tokens are replaced by random codes so the model does not copy.
  c.prefix = ml_collections.ConfigDict()
  c.prefix.probability = 0.25
  c.prefix.corrupt_fraction = 0.0
  # Long-term memory (model.memory_token_frames > 0; experimental): an
  # example's memory tokens are dropped (all-False memory mask) with this
  # probability, which trains the memory-free model that memory guidance
  # (sampling.memory_guidance_scale) contrasts with. See compute_losses in
  # phenaki_jax/train/train_maskgit.py for where the memory comes from.
  c.memory = ml_collections.ConfigDict()
  c.memory.drop_rate = 0.5
  c.loss = ml_collections.ConfigDict()
  c.loss.label_smoothing = 0.0
  return c


def ref_defaults(workdir: bool) -> ml_collections.ConfigDict:
  """`generator.*` of a job that loads a trained generator (workdir: its own key)."""
  c = ml_collections.ConfigDict()
  if workdir:
    c.workdir = ""  # required: the workdir of a configs/maskgit.py run
  c.step = -1  # -1: newest good checkpoint
  c.use_ema = True
  # '' decodes with the tokenizer the generator trained on (its tokenizer.json).
  c.tokenizer_workdir = ""
  return c


def check_ref(config: ml_collections.ConfigDict) -> None:
  g = config.generator
  errors.require(bool(g.workdir), "generator.workdir", g.workdir,
                 "is required: the workdir of a trained generator (configs/maskgit.py), e.g. "
                 "--config.generator.workdir=runs/maskgit")
  errors.require(isinstance(g.step, int) and g.step >= -1, "generator.step", g.step,
                 "must be a checkpoint step, or -1 for the newest")


def _grid(config: ml_collections.ConfigDict):
  g = config.model.token_grid
  return tuple(g) if isinstance(g, (tuple, list)) else g


def check_grid(config: ml_collections.ConfigDict) -> None:
  """The token grid (after POSITIVE_KEYS)."""
  grid = _grid(config)
  errors.require(isinstance(grid, tuple) and len(grid) == 3
                 and all(isinstance(x, int) and x > 0 for x in grid), "model.token_grid",
                 config.model.token_grid, "must be three positive integers (token frames, h, w)")


def check_guidance(config: ml_collections.ConfigDict) -> None:
  errors.require(0.0 <= config.text_drop_rate <= 1.0, "text_drop_rate", config.text_drop_rate,
                 "must be in [0, 1]")


def check_tasks(config: ml_collections.ConfigDict) -> None:
  """Masks, prefix and memory tasks, and the loss (after check_grid)."""
  sampling.check_mask_schedule(config)
  errors.require(0.0 <= config.prefix.probability <= 1.0, "prefix.probability",
                 config.prefix.probability, "must be in [0, 1]")
  errors.require(0.0 <= config.prefix.corrupt_fraction <= 1.0, "prefix.corrupt_fraction",
                 config.prefix.corrupt_fraction, "must be in [0, 1]")
  m, grid = config.model, _grid(config)
  errors.require(isinstance(m.memory_token_frames, int) and 0 <= m.memory_token_frames < grid[0],
                 "model.memory_token_frames", m.memory_token_frames,
                 f"must be in [0, {grid[0]}) (0: no memory; fewer than the token frames of a "
                 "clip, so a clip keeps frames to learn after its memory)")
  errors.require(0.0 <= config.memory.drop_rate <= 1.0, "memory.drop_rate",
                 config.memory.drop_rate, "must be in [0, 1]")
  errors.require(0.0 <= config.loss.label_smoothing < 1.0, "loss.label_smoothing",
                 config.loss.label_smoothing, "must be in [0, 1)")


def mesh_splits(config: ml_collections.ConfigDict) -> dict[str, tuple[int, str]]:
  """The sizes the mesh splits (weights are created sharded): {key: (value, logical axis)}."""
  m = config.model
  return {"model.num_heads": (m.num_heads, "heads"), "model.width": (m.width, "embed"),
          "model.mlp_dim": (m.mlp_dim, "mlp"), "model.codebook_size": (m.codebook_size, "vocab")}
