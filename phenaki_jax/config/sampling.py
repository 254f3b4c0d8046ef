"""The sampling section (`config.sampling.*`, `config.story_defaults.*`): how tokens are decoded.

The sampling job and the generated-video evaluation (which samples a MaskGIT
workdir) share these keys; the generator trainer's masks use MASK_SCHEDULES.
"""
from __future__ import annotations

import ml_collections

from phenaki_jax.config import errors
from phenaki_jax.config import mesh as mesh_section

# γ(r) of MaskGIT's masks (phenaki_jax/sampling/mask_schedule.py), for training and decoding.
MASK_SCHEDULES = ("cosine", "linear", "square")


def defaults() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.num_steps = 12
  c.guidance_scale = 3.0  # 1: conditional model only; 0: unconditional
  c.temperature = 1.0
  c.choice_temperature = 4.5
  # How the guidance scale moves as tokens are decided: 'constant',
  # 'increasing' (1 -> guidance_scale) or 'decreasing' (guidance_scale -> 1).
  c.guidance_schedule = "constant"
  c.top_k = 0  # 0: every code
  c.max_steps = 48  # static loop bound: one compilation for num_steps <= it
  # Stories only, experimental (phenaki_jax/sampling/story.py; benchmarks/RESULTS.md;
  # a storyboard's defaults or segments may set them too):
  # guidance of the long-term memory (a generator with model.memory_token_frames
  # > 0): uncond + s·(cond − uncond) + memory_guidance_scale·(cond_memory − cond);
  # 0: no memory (plain CFG, two passes instead of three).
  c.memory_guidance_scale = 0.0
  # Randomised blending of the seam: each decoding step keeps the prefix token
  # frames before a random split and re-samples the rest (parallel_decode.decode).
  c.seam_blending = False
  return c


def prompt_defaults() -> ml_collections.ConfigDict:
  """What a sampling job samples (top-level keys): prompts, batches, seeds."""
  c = ml_collections.ConfigDict()
  c.prompts = ""  # separated by ';'
  c.prompts_file = ""  # one prompt a line
  c.seed = 0  # batch i samples with seed + i
  c.batch_size = 8  # clips per sampling call (a short last batch is padded)
  # The mesh sampling runs on, over every device of every process: (data,
  # fsdp, tensor), one -1 takes the remaining devices. Weights are laid out
  # by the generator's logical_axis_rules: 'fsdp' and 'tensor' split them,
  # and the batch goes over 'data' and 'fsdp', so batch_size must divide by
  # data·fsdp; 'tensor' splits weights without splitting the batch (the way
  # to sample a few prompts with a model one chip cannot hold).
  c.mesh = ml_collections.ConfigDict()
  c.mesh.shape = (-1, 1, 1)
  return c


def check_mesh(config: ml_collections.ConfigDict, generator_config: ml_collections.ConfigDict,
               num_devices: int) -> tuple[int, ...]:
  """config.mesh.shape fits the devices and config.batch_size splits over it; its shape.

  `generator_config`'s rules say which mesh axes split the batch.
  """
  try:
    shape = mesh_section.resolve_mesh_shape(config.mesh.shape, num_devices)
  except ValueError as e:
    raise errors.ConfigError(f"{e} (the sampling mesh, over all {num_devices} devices)"
                             ) from None
  ways = mesh_section.batch_ways(generator_config, shape)
  errors.require(config.batch_size % ways == 0, "batch_size", config.batch_size,
                 f"must be divisible by the {ways} ways the mesh {shape} (config.mesh.shape="
                 f"{tuple(config.mesh.shape)}) splits the batch over data·fsdp; set "
                 f"config.batch_size to a multiple of {ways}, or put devices on the 'tensor' "
                 "axis, which splits the weights and not the batch")
  return shape


def story_defaults() -> ml_collections.ConfigDict:
  """How a story's segments are cut into windows (`config.story_defaults.*`)."""
  c = ml_collections.ConfigDict()
  c.num_frames = 0  # new frames per segment; 0: one window's worth
  # K frames re-encoded as the next window's prefix (1 + m·temporal patch);
  # -1: the longest such K of about half the window (5 of 11 frames).
  c.context_frames = -1
  return c


def check_story(config: ml_collections.ConfigDict) -> None:
  s = config.story_defaults
  errors.require(s.num_frames >= 0, "story_defaults.num_frames", s.num_frames,
                 "must be >= 0 (0: one window)")
  errors.require(s.context_frames >= -1, "story_defaults.context_frames", s.context_frames,
                 "must be >= 0 (0: cuts between windows), or -1 for about half the window")


def check_mask_schedule(config: ml_collections.ConfigDict) -> None:
  errors.require(config.mask_schedule in MASK_SCHEDULES, "mask_schedule", config.mask_schedule,
                 f"must be one of {MASK_SCHEDULES}")
