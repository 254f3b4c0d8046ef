"""Python API of a trained text-to-video generator: prompts in, videos out.

  from phenaki_jax.generator import Generator
  gen = Generator.load("runs/maskgit")       # newest good checkpoint, EMA weights
  videos = gen.generate(["a large red circle moves right"], seed=0)
  # uint8 (B, T, H, W, 3); gen.tokenizer decodes, gen.sample_tokens stops at tokens

The generator's workdir names the frozen C-ViViT it trained on (tokenizer.json,
written by the trainer); that tokenizer checkpoint is loaded to turn the
sampled tokens into frames. Sampling is one jitted MaskGIT decoding loop with
classifier-free guidance; it compiles once per batch size and token-grid
shape, and the step count, guidance scale and temperatures are traced values.

Everything lives on one mesh (`Generator.load(mesh=...)`; default all of this
process's devices): the generator's weights (EMA or raw, nothing else read)
and the frozen text encoder's by the generator's logical-axis rules, the
tokenizer's by its own (tokenizer.tokenizer_placement). A batch of prompts is
split over the mesh's batch axes (padded when it does not divide) and the
tokens come back replicated, so on several processes, each calling with the
same prompts and seed, every one gets the same videos.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from phenaki_jax import checkpointing, metrics, sharding, storage, train_state
from phenaki_jax import placement as placement_lib
from phenaki_jax.placement import Placement
from phenaki_jax import tokenizer as tokenizer_lib
from phenaki_jax.config import schema
from phenaki_jax.models import cvivit, maskgit
from phenaki_jax.sampling import parallel_decode
from phenaki_jax.text.encoder import TextEncoder, build_text_encoder, encode_text
from phenaki_jax.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
  """How tokens are drawn (see parallel_decode.decode).

  Attributes:
    num_steps: decoding steps, 1 ≤ num_steps ≤ max_steps.
    guidance_scale: classifier-free guidance; 1 is the plain conditional model,
      0 the unconditional one.
    temperature: divides the logits before sampling.
    choice_temperature: Gumbel noise on the confidence that picks which
      tokens to keep, annealed to 0 over the steps.
    top_k: sample among the k most likely codes only; 0: all.
    max_steps: static bound of the loop (one compilation for every num_steps
      up to it).
    memory_guidance_scale: with memory tokens (a generator with long-term
      memory, in a story's later windows): uncond + guidance_scale·(cond −
      uncond) + memory_guidance_scale·(cond_with_memory − cond); 0: the
      memory is not used. Experimental.
    seam_blending: with prefix tokens, re-draw at every decoding step how many
      prefix token frames stay frozen (parallel_decode.decode). Experimental.
    guidance_schedule: how guidance_scale varies as tokens are decided:
      'constant', 'increasing' (1 → scale) or 'decreasing' (scale → 1);
      parallel_decode.scheduled_guidance.
  """
  num_steps: int = 12
  guidance_scale: float = 3.0
  temperature: float = 1.0
  choice_temperature: float = 4.5
  top_k: int = 0
  max_steps: int = 48
  memory_guidance_scale: float = 0.0
  seam_blending: bool = False
  guidance_schedule: str = "constant"

  @classmethod
  def from_config(cls, sampling_cfg: ml_collections.ConfigDict,
                  where: str = "sampling.") -> "SamplingOptions":
    """config.sampling's options, checked (errors name config.`where`KEY)."""
    options = cls(**{f.name: sampling_cfg[f.name] for f in dataclasses.fields(cls)})
    options.check(where)
    return options

  def check(self, where: str = "") -> None:
    def bad(key, why):
      raise schema.ConfigError(f"config.{where}{key}={getattr(self, key)!r}: {why}")
    if not 1 <= self.max_steps:
      bad("max_steps", "must be >= 1")
    if not 1 <= self.num_steps <= self.max_steps:
      bad("num_steps", f"must be in [1, max_steps={self.max_steps}]")
    if self.temperature <= 0:
      bad("temperature", "must be > 0")
    if self.choice_temperature < 0:
      bad("choice_temperature", "must be >= 0")
    if self.guidance_scale < 0:
      bad("guidance_scale", "must be >= 0")
    if self.top_k < 0:
      bad("top_k", "must be >= 0 (0: all codes)")
    if self.memory_guidance_scale < 0:
      bad("memory_guidance_scale", "must be >= 0 (0: no memory)")
    if not isinstance(self.seam_blending, (bool, np.bool_)):
      bad("seam_blending", "must be true or false")
    if self.guidance_schedule not in parallel_decode.GUIDANCE_SCHEDULES:
      bad("guidance_schedule", f"must be one of {parallel_decode.GUIDANCE_SCHEDULES}")


@dataclasses.dataclass
class Generator:
  """A trained MaskGIT generator, its text encoder and its frozen tokenizer, on one mesh."""
  model: maskgit.MaskGitTransformer
  text: TextEncoder
  params: Any  # {'generator': ..., 'text_encoder': ... when it trained}
  frozen_text_params: Any
  tokenizer: Tokenizer
  config: ml_collections.ConfigDict
  step: int
  placement: Placement
  tokenizer_workdir: str = ""

  @staticmethod
  def read_config(workdir: str, step: int | None = None) -> ml_collections.ConfigDict:
    """The saved config of a configs/maskgit.py run (at `step`, default the newest)."""
    steps = _checked_steps(workdir, step)
    ckpt = checkpointing.Checkpointer(storage.join(workdir, "checkpoints"), max_to_keep=1000,
                                      async_save=False)
    try:
      return schema.complete(ml_collections.ConfigDict(
          ckpt.restore_config(step if step is not None else steps[-1])))
    finally:
      ckpt.close()

  @classmethod
  def load(cls, workdir: str, step: int | None = None, use_ema: bool = True,
           tokenizer_workdir: str | None = None, *,
           mesh: jax.sharding.Mesh | None = None) -> "Generator":
    """Restores a configs/maskgit.py run (the newest good step by default).

    The tokenizer is the one recorded in WORKDIR/tokenizer.json (workdir and
    step), unless `tokenizer_workdir` points elsewhere (its newest step).
    `mesh`: where the weights go and sampling runs; default all of this
    process's devices in the run's mesh.shape (data-parallel when that does
    not fit them). On several processes pass a global mesh, and every
    process calls this (and then each sampling method) together. A given
    mesh the generator's weights do not split evenly on is an error naming
    them.
    """
    _checked_steps(workdir, step)
    config = cls.read_config(workdir, step)
    text = build_text_encoder(config.text)
    model = train_state.build_maskgit(config)
    placement, target_params = generator_placement(config, model, text, mesh)
    tok, tok_dir = tokenizer_lib.load_recorded(workdir, tokenizer_workdir,
                                               mesh=placement.mesh)
    tokenizer_lib.check_tokenizer_match(config, tok.config, f"{tok_dir} (step {tok.step})")
    ckpt = checkpointing.Checkpointer(storage.join(workdir, "checkpoints"), max_to_keep=1000,
                                      async_save=False)
    field = "ema_params" if use_ema else "params"
    target = {field: target_params}
    if step is None:
      restored, step = ckpt.restore_latest(target, partial=True)
    else:
      restored = ckpt.restore(step, target, partial=True)
    ckpt.close()
    frozen_text = {}
    if not text.trainable:
      frozen_text = sharding.place(text.pretrained, frozen_text_shardings(config, text,
                                                                          placement))
    return cls(model=model, text=text, params=restored[field], frozen_text_params=frozen_text,
               tokenizer=tok, config=config, step=int(step), placement=placement,
               tokenizer_workdir=tok_dir)

  @property
  def mesh(self) -> jax.sharding.Mesh:
    return self.placement.mesh

  def __post_init__(self):
    self._sample = jax.jit(sample_fn(self.model, self.text), static_argnames=SAMPLE_STATIC,
                           out_shardings=self.placement.replicated)

  @property
  def memory_token_frames(self) -> int:
    """Token frames of long-term memory the generator takes; 0: none."""
    return int(self.model.memory_token_frames)

  @property
  def token_grid(self) -> tuple[int, int, int]:
    return tuple(int(x) for x in self.config.model.token_grid)

  @property
  def num_frames(self) -> int:
    return int(self.config.input.num_frames)

  def encode_prompts(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Host side: prompts -> (text_ids, text_mask) of config.text.max_length."""
    return self.text.tokenizer.encode_batch([str(p) for p in prompts],
                                            self.config.text.max_length)

  def sample_tokens(self, prompts: Sequence[str], *, seed: int = 0,
                    options: SamplingOptions = SamplingOptions(),
                    prefix_tokens: Any = None, num_token_frames: int | None = None,
                    memory_tokens: Any = None) -> np.ndarray:
    """Tokens (B, t, h, w) for the prompts; example i samples with seed + i.

    `prefix_tokens` (B, k, h, w), k < t, are kept as given (a story's frozen
    context; with options.seam_blending the frames after frame 0 are blended,
    see parallel_decode.decode); the rest is generated. `num_token_frames` <
    the trained length samples a shorter clip (1: an image). `memory_tokens`
    (B, m, h, w), m = memory_token_frames, are the long-term memory (a
    story's first token frames), weighted by options.memory_guidance_scale;
    None or a scale of 0: none (the plain two-pass sampler).
    """
    options.check()
    t, h, w = self.token_grid
    t = num_token_frames or t
    if not 1 <= t <= self.token_grid[0]:
      raise ValueError(f"num_token_frames={t}: this generator makes 1..{self.token_grid[0]}")
    b = len(prompts)
    ids, mask = self.encode_prompts(prompts)
    start = np.full((b, t, h, w), self.model.mask_id, np.int32)
    if prefix_tokens is not None:
      prefix = np.asarray(prefix_tokens, np.int32)
      if prefix.shape[0] != b or prefix.shape[1] >= t or prefix.shape[2:] != (h, w):
        raise ValueError(f"prefix_tokens {prefix.shape}: expected ({b}, k < {t}, {h}, {w})")
      start[:, :prefix.shape[1]] = prefix
    memory = None
    if memory_tokens is not None:
      m = self.memory_token_frames
      if not m:
        raise ValueError("memory_tokens given, but this generator has no long-term memory "
                         "(its config.model.memory_token_frames is 0)")
      memory = np.asarray(memory_tokens, np.int32)
      if memory.shape != (b, m, h, w):
        raise ValueError(f"memory_tokens {memory.shape}: expected {(b, m, h, w)}")
    # Every example's values on every process: batch arrays split over the
    # mesh's batch axes (padded with copies of the last example: with
    # partitionable threefry an example's random draws do not depend on the
    # batch size, so padding changes no real example), scalars replicated.
    p = self.placement
    put, rep = p.put_batch, p.put_replicated
    # Nones keep the plain sampler (and its compilation) when an option is off.
    memory_args = None
    if memory is not None and options.memory_guidance_scale > 0:
      memory_args = (put(memory), rep(np.float32(options.memory_guidance_scale)))
    seam = None
    if prefix_tokens is not None and options.seam_blending:
      seam = put(np.full((b,), prefix.shape[1], np.int32))
    # Example i draws from seed + i alone: its tokens depend on its prompt and
    # seed, not on the rest of the batch or its place in it.
    key = put(np.stack([np.asarray(jax.random.key_data(jax.random.key(seed + i)))
                        for i in range(b)]))
    scalars = rep((np.int32(options.num_steps), np.float32(options.guidance_scale),
                   np.float32(options.temperature), np.float32(options.choice_temperature)))
    with p.context():
      tokens = self._sample(self.params, self.frozen_text_params, put(ids), put(mask), key,
                            put(start), *scalars, memory_args, seam,
                            max_steps=options.max_steps, top_k=options.top_k or None,
                            schedule=self.config.mask_schedule,
                            guidance_schedule=options.guidance_schedule)
    return np.asarray(tokens)[:b]

  def decode(self, tokens: Any) -> np.ndarray:
    """Tokens (B, t, h, w) -> uint8 frames (B, 1 + (t−1)·t_p, H, W, 3)."""
    return metrics.to_uint8(np.asarray(self.tokenizer.decode(tokens)))

  def generate(self, prompts: Sequence[str], *, seed: int = 0,
               options: SamplingOptions = SamplingOptions(),
               num_frames: int | None = None) -> np.ndarray:
    """uint8 videos (B, T, H, W, 3); `num_frames` = 1 + k·t_p up to the trained length.

    Example i samples with seed + i, so generate(prompts, seed=s)[i] equals
    generate([prompts[i]], seed=s + i)[0].
    """
    num_token_frames = None
    if num_frames is not None:
      tp = self.tokenizer.config.model.temporal_patch_size
      if num_frames < 1 or (num_frames - 1) % tp:
        raise ValueError(f"num_frames={num_frames}: the tokenizer makes 1 + k·{tp} frames")
      num_token_frames = cvivit.num_token_frames(num_frames, tp)
    tokens = self.sample_tokens(prompts, seed=seed, options=options,
                                num_token_frames=num_token_frames)
    return self.decode(tokens)


  def start_lengths(self) -> list[int]:
    """Frame counts a start can have: 1 + j·t_p that leave at least one token frame to make."""
    tp = int(self.tokenizer.config.model.temporal_patch_size)
    return [cvivit.num_frames_of(m, tp) for m in range(1, self.token_grid[0])]

  def continue_from(self, prompts: Sequence[str], start: Any, *, seed: int = 0,
                    options: SamplingOptions = SamplingOptions(),
                    include_start: bool = True) -> np.ndarray:
    """Videos that go on from given frames: image-to-video (one frame) or continuation.

    `start`: uint8 frames (K, H, W, 3), the same for every prompt, or
    (B, K, H, W, 3), one per prompt, at the tokenizer's resolution; K one of
    `start_lengths()` (phenaki_jax/sampling/start.py reads an image or a
    video file into this). The causal tokenizer encodes them (an image
    through the first-frame path) into the window's frozen prefix, as a
    story's context is; the rest of the window is generated for the prompt.
    Returns uint8 (B, T, H, W, 3): the start frames as given, then the new
    ones (T = the trained length), or only the T − K new ones with
    include_start=False.
    """
    frames = np.asarray(start)
    if frames.ndim == 4:
      frames = np.repeat(frames[None], len(prompts), axis=0)
    r = self.tokenizer.config.input.resolution
    if (frames.ndim != 5 or frames.shape[0] != len(prompts) or frames.shape[2:] != (r, r, 3)
        or frames.dtype != np.uint8):
      raise ValueError(f"start frames {frames.dtype} {frames.shape}: expected uint8 (K, {r}, "
                       f"{r}, 3) or ({len(prompts)}, K, {r}, {r}, 3)")
    k = frames.shape[1]
    if k not in self.start_lengths():
      raise ValueError(f"a start of {k} frames: this generator continues from one of "
                       f"{self.start_lengths()} frames (1 + j·temporal_patch_size, shorter "
                       f"than its {self.num_frames}-frame window)")
    prefix = np.asarray(self.tokenizer.encode(frames))
    tokens = self.sample_tokens(prompts, seed=seed, options=options, prefix_tokens=prefix)
    new = self.decode(tokens)[:, k:]
    return np.concatenate([frames, new], axis=1) if include_start else new

  @property
  def trained_to_continue(self) -> bool:
    """Whether training gave it frozen prefixes to go on from (config.prefix.probability > 0)."""
    prefix = self.config.get("prefix") or {}
    return float(prefix.get("probability", 0.0)) > 0


# The sampler's static arguments (one compilation per combination).
SAMPLE_STATIC = ("max_steps", "top_k", "schedule", "guidance_schedule")


def sample_fn(model: maskgit.MaskGitTransformer, text: TextEncoder):
  """The sampler Generator jits (static_argnames=SAMPLE_STATIC); see _sample_tokens."""
  return functools.partial(_sample_tokens, model, text)


def _sample_tokens(model: maskgit.MaskGitTransformer, text: TextEncoder, params: Any,
                   frozen_text_params: Any, text_ids: jax.Array, text_mask: jax.Array,
                   rng: jax.Array, start: jax.Array, num_steps: jax.Array,
                   guidance_scale: jax.Array, temperature: jax.Array,
                   choice_temperature: jax.Array,
                   memory_args: tuple[jax.Array, jax.Array] | None = None,
                   seam_frames: jax.Array | None = None, *, max_steps: int,
                   top_k: int | None, schedule: str,
                   guidance_schedule: str = "constant") -> jax.Array:
  """MaskGIT decoding with CFG; the conditional and unconditional passes share one batch.

  `rng` is key data (jax.random.key_data), one key per example (B, 2), so it
  can be placed on a mesh as a plain uint32 array split like the batch.

  `memory_args` = (memory tokens (B, m, h, w), memory guidance scale): a
  third pass with text and memory joins the batch (parallel_decode.
  guide_with_memory). `seam_frames` (B,): prefix token frames to blend.
  """
  rng = jax.random.wrap_key_data(rng)
  context, mask = encode_text(text, params, frozen_text_params,
                              {"text_ids": text_ids, "text_mask": text_mask})
  b = start.shape[0]
  grid = start.shape[1:]
  # Passes in one batch: (text), (nothing) and, with memory, (text + memory).
  # The unconditional pass sees no text at all: its mask is all False, as for
  # the examples whose text was dropped in training.
  passes = 2 if memory_args is None else 3
  all_context = jnp.concatenate([context] * passes, axis=0)
  all_mask = jnp.concatenate([mask, jnp.zeros_like(mask), mask][:passes], axis=0)
  memory_kw = {}
  if memory_args is not None:
    memory, memory_scale = memory_args
    memory_kw = {"memory": jnp.concatenate([memory] * passes, axis=0),
                 "memory_mask": jnp.arange(passes * b) >= 2 * b}

  # Per example: the share of its generated tokens decided so far.
  to_generate = jnp.maximum(jnp.sum(start == model.mask_id, axis=(1, 2, 3)), 1)

  # A shorter clip (an image: 1 token frame) is decoded as training shows it
  # one: on the whole grid, the frames after it [MASK] and never revealed.
  padding = model.max_token_frames - grid[0]

  def logits_fn(flat_tokens: jax.Array) -> jax.Array:
    revealed = 1.0 - jnp.sum(flat_tokens == model.mask_id, axis=1) / to_generate
    scale = parallel_decode.scheduled_guidance(guidance_scale, revealed,
                                               guidance_schedule)[:, None, None]
    tokens = parallel_decode.unflatten_tokens(flat_tokens, grid)
    if padding:
      tokens = jnp.pad(tokens, ((0, 0), (0, padding), (0, 0), (0, 0)),
                       constant_values=model.mask_id)
    logits = model.apply({"params": params["generator"]}, jnp.concatenate([tokens] * passes),
                         all_context, all_mask, **memory_kw)
    logits = logits.reshape(passes, b, -1, logits.shape[-1])[:, :, :flat_tokens.shape[1]]
    if memory_args is None:
      return parallel_decode.guide(logits[0], logits[1], scale)
    return parallel_decode.guide_with_memory(logits[0], logits[1], logits[2], scale,
                                             memory_scale)

  seam_kw = {}
  if seam_frames is not None:
    seam_kw = {"seam_prefix_frames": seam_frames, "tokens_per_frame": grid[1] * grid[2]}
  out = parallel_decode.decode(
      logits_fn, rng, parallel_decode.flatten_tokens(start), num_steps, mask_id=model.mask_id,
      max_steps=max_steps, temperature=temperature, choice_temperature=choice_temperature,
      top_k=top_k, schedule=schedule, **seam_kw)
  return parallel_decode.unflatten_tokens(out.tokens, grid)


# --- Where the weights go.

def _checked_steps(workdir: str, step: int | None) -> list[int]:
  steps = checkpointing.finalized_steps(workdir)
  if not steps:
    raise FileNotFoundError(
        f"no generator checkpoint in {storage.join(workdir, 'checkpoints')}; train one: "
        f"python -m phenaki_jax.main --config=configs/maskgit.py --workdir={workdir}")
  if step is not None and step not in steps:
    raise FileNotFoundError(f"{workdir} has no checkpoint step {step}; it has {steps}")
  return steps


def generator_placement(config: ml_collections.ConfigDict, model: maskgit.MaskGitTransformer,
                        text: TextEncoder, mesh: jax.sharding.Mesh | None = None
                        ) -> tuple[Placement, Any]:
  """(placement, abstract generator params with their shardings) on `mesh`.

  By the run's logical-axis rules. With no mesh: placement.inference_mesh,
  and all those devices data-parallel if the weights do not split evenly on
  it; a given mesh they do not split on is a ValueError naming the weights.
  """
  given = mesh is not None
  mesh = placement_lib.inference_mesh(config) if mesh is None else mesh
  boxed = jax.eval_shape(train_state.maskgit_params_init_fn(model, text, config),
                         jax.random.key(0))
  placement = Placement.of(mesh, config.logical_axis_rules)
  abstract = placement_lib.abstract_on(boxed, placement)
  bad = placement_lib.indivisible(abstract, mesh)
  if bad and given:
    raise ValueError(
        f"the generator's weights do not split evenly on the mesh {dict(mesh.shape)} by its "
        f"config.logical_axis_rules: {'; '.join(bad[:3])}"
        f"{f' (and {len(bad) - 3} more)' if len(bad) > 3 else ''}; choose a mesh whose "
        "fsdp / tensor sizes divide those dimensions")
  if bad:
    placement = Placement.of(placement_lib.data_parallel_mesh(mesh), config.logical_axis_rules)
    abstract = placement_lib.abstract_on(boxed, placement)
  return placement, abstract


def frozen_text_shardings(config: ml_collections.ConfigDict, text: TextEncoder,
                          placement: Placement) -> Any:
  """Shardings of a frozen text encoder's params: by the rules, or replicated if they do
  not split evenly (its sizes are the pretrained T5's, not the generator config's)."""
  boxed = jax.eval_shape(text.module.init, jax.random.key(0),
                         jnp.ones((1, config.text.max_length), jnp.int32))["params"]
  shardings = sharding.tree_shardings(boxed, placement.mesh, placement.rules)
  abstract = checkpointing.abstract_with_shardings(sharding.strip_boxes(boxed), shardings)
  if placement_lib.indivisible(abstract, placement.mesh):
    return jax.tree.map(lambda _: placement.replicated, shardings)
  return shardings

