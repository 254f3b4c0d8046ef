"""Python API of a trained C-ViViT: the one way to load a tokenizer, encode and decode clips.

  from phenaki_jax.tokenizer import Tokenizer
  tok = Tokenizer.load("runs/cvivit")          # newest good checkpoint, EMA weights
  codes = tok.encode(frames)                   # uint8 (B, T, H, W, 3) -> int32 (B, 1+k, h, w)
  video = tok.decode(codes)                    # -> float32 (B, 1+k·t_p, H, W, 3) in [-1, 1]

Loading restores the weights only (orbax partial restore: no optimizer, no
discriminator), straight into their shardings on a mesh: the caller's
(`mesh=`; on several processes a global mesh, every process calling load
together), else all of this process's devices (inference_mesh). encode /
decode / reconstruct run jitted on that mesh: the batch is split over the
mesh's batch axes (a host batch is the whole batch, the same on every
process; one that does not divide is padded and cut back) and the results
come back replicated, so every process can read them with np.asarray.

Every job that needs a tokenizer comes here: the generator's trainer and its
Generator (through the record a generator run keeps of the tokenizer step it
trained on, TOKENIZER_RECORD), evaluation and pre-tokenising
(load_from_config). Where it runs: phenaki_jax/placement.py.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from phenaki_jax import checkpointing, storage, train_state
from phenaki_jax.placement import (Placement, abstract_on, batch_only_rules, indivisible,
                                   inference_mesh)
from phenaki_jax.config import schema
from phenaki_jax.config.schema import ConfigError
from phenaki_jax.models import cvivit

# Where a generator run records the tokenizer checkpoint it trains on.
TOKENIZER_RECORD = "tokenizer.json"


def _cut(x: jax.Array, n: int) -> jax.Array:
  return x if x.shape[0] == n else x[:n]


def reconstruct_fn(model: cvivit.CViViT) -> Callable[[Any, jax.Array], tuple[jax.Array, jax.Array]]:
  """(params, frames in [-1, 1]) -> (reconstruction clipped to [-1, 1], codes)."""
  def reconstruct(params: Any, video: jax.Array):
    recon, aux = model.apply({"params": params}, video)
    return jnp.clip(recon, -1.0, 1.0), aux["codes"]
  return reconstruct


def encode_fn(model: cvivit.CViViT) -> Callable[[Any, jax.Array], jax.Array]:
  """(params, uint8 or float frames) -> codes; what Tokenizer.encode jits."""
  return lambda p, v: model.apply({"params": p}, _as_float(v), method=model.encode)[1]["codes"]


def decode_fn(model: cvivit.CViViT) -> Callable[[Any, jax.Array], jax.Array]:
  """(params, codes) -> frames in [-1, 1]; what Tokenizer.decode jits."""
  return lambda p, c: jnp.clip(model.apply({"params": p}, c, method=model.decode), -1.0, 1.0)


def _as_float(frames: jax.Array) -> jax.Array:
  """uint8 [0, 255] -> float [-1, 1] on device (a uint8 batch travels at a quarter the bytes)."""
  if frames.dtype == jnp.uint8:
    return frames.astype(jnp.float32) / 127.5 - 1.0
  return frames.astype(jnp.float32)


def tokenizer_placement(config: ml_collections.ConfigDict, abstract_boxed: Any,
                        mesh: Mesh) -> tuple[Placement, Any]:
  """(placement, abstract params with their shardings) of a tokenizer on `mesh`.

  By the tokenizer's own rules when its weights split evenly there; else
  (e.g. its 8 heads on a generator's 16-way tensor axis) whole weights on
  every device and only the batch split: the tokenizer is small next to the
  generator it serves.
  """
  placement = Placement.of(mesh, config.logical_axis_rules)
  abstract = abstract_on(abstract_boxed, placement)
  bad = indivisible(abstract, mesh)
  if bad:
    logging.info("tokenizer weights do not split evenly on mesh %s (%s, ...): replicated, "
                 "batch split only", dict(mesh.shape), bad[0])
    placement = Placement.of(mesh, batch_only_rules(config.logical_axis_rules))
    abstract = abstract_on(abstract_boxed, placement)
  return placement, abstract


def cvivit_abstract_boxed(config: ml_collections.ConfigDict, model: cvivit.CViViT) -> Any:
  """The tokenizer's parameter shapes, boxed with their logical axis names."""
  r = config.input.resolution
  dummy = jnp.zeros((1, config.input.num_frames, r, r, 3), jnp.float32)
  return jax.eval_shape(model.init, jax.random.key(0), dummy)["params"]


@dataclasses.dataclass
class Tokenizer:
  """A C-ViViT with its parameters laid out on `placement.mesh`."""
  model: cvivit.CViViT
  params: Any
  config: ml_collections.ConfigDict
  step: int
  placement: Placement

  @classmethod
  def load(cls, workdir: str, step: int | None = None, use_ema: bool = True, *,
           newest: int | None = None, mesh: Mesh | None = None) -> "Tokenizer":
    """Restores the weights from `workdir/checkpoints` (the newest good step by default).

    `use_ema` takes the exponential moving average of the weights, which
    evaluation uses too; False takes the last step's raw weights. `newest`
    (with no `step`): the newest good step up to this one. `mesh`: where the
    weights go (default inference_mesh: this process's devices); a global
    mesh on several processes. On several processes every one calls this
    together (orbax restores collectively).
    """
    ckpt = checkpointing.Checkpointer(storage.join(workdir, "checkpoints"), max_to_keep=1000,
                                      async_save=False)
    steps = [s for s in ckpt.all_steps() if newest is None or s <= newest]
    if not steps:
      raise FileNotFoundError(f"no C-ViViT checkpoint in {workdir}/checkpoints")
    config_step = step if step is not None else steps[-1]
    config = schema.complete(ml_collections.ConfigDict(ckpt.restore_config(config_step)))
    model = train_state.build_cvivit(config)
    mesh = inference_mesh(config) if mesh is None else mesh
    placement, params = tokenizer_placement(config, cvivit_abstract_boxed(config, model), mesh)
    field = "ema_params" if use_ema else "params"
    target = {field: params}
    if step is None:
      restored, step = ckpt.restore_latest(target, partial=True, max_step=newest)
    else:
      restored = ckpt.restore(step, target, partial=True)
    ckpt.close()
    return cls(model=model, params=restored[field], config=config, step=int(step),
               placement=placement)

  @property
  def mesh(self) -> Mesh:
    return self.placement.mesh

  def __post_init__(self):
    out = self.placement.replicated
    self._encode = jax.jit(encode_fn(self.model), out_shardings=out)
    self._decode = jax.jit(decode_fn(self.model), out_shardings=out)
    self._reconstruct = jax.jit(lambda p, v: reconstruct_fn(self.model)(p, _as_float(v)),
                                out_shardings=(out, out))

  def _run(self, fn: Callable, x: Any, dtype: Any = None) -> Any:
    n = int(np.shape(x)[0])
    if dtype is not None and not isinstance(x, jax.Array):
      x = np.asarray(x, dtype)
    with self.placement.context():
      out = fn(self.params, self.placement.put_batch(x))
    return jax.tree.map(lambda y: _cut(y, n), out)

  def encode(self, frames: Any) -> jax.Array:
    """uint8 [0, 255] or float [-1, 1] frames (B, T, H, W, 3) -> codes (B, 1+k, h, w)."""
    return self._run(self._encode, _host_frames(frames))

  def decode(self, codes: Any) -> jax.Array:
    """Codes (B, 1+k, h, w) -> float frames (B, 1+k·t_p, H, W, 3) in [-1, 1]."""
    if isinstance(codes, jax.Array) and codes.dtype != jnp.int32:
      codes = codes.astype(jnp.int32)
    return self._run(self._decode, codes, np.int32)

  def reconstruct(self, frames: Any) -> jax.Array:
    return self.decode(self.encode(frames))

  def reconstruct_with_codes(self, frames: Any) -> tuple[jax.Array, jax.Array]:
    """Frames -> (reconstruction in [-1, 1], codes), one jitted pass through the whole model."""
    return self._run(self._reconstruct, _host_frames(frames))


def _host_frames(frames: Any) -> Any:
  """uint8 stays uint8 (converted on device); other host values become float32."""
  if isinstance(frames, jax.Array):
    return frames
  frames = np.asarray(frames)
  return frames if frames.dtype == np.uint8 else frames.astype(np.float32)


def checked_steps(tok_cfg: ml_collections.ConfigDict) -> list[int]:
  """config.tokenizer.workdir's checkpoint steps; errors name the key (workdir, or a missing step)."""
  steps = checkpointing.finalized_steps(tok_cfg.workdir)
  if not steps:
    raise ConfigError(
        f"config.tokenizer.workdir={tok_cfg.workdir!r}: no C-ViViT checkpoint in "
        f"{storage.join(tok_cfg.workdir, 'checkpoints')}; train one first: python -m "
        f"phenaki_jax.main --config=configs/cvivit.py --workdir={tok_cfg.workdir}")
  if tok_cfg.step >= 0 and tok_cfg.step not in steps:
    raise ConfigError(f"config.tokenizer.step={tok_cfg.step}: {tok_cfg.workdir} has checkpoint "
                      f"steps {steps}")
  return steps


def load_from_config(tok_cfg: ml_collections.ConfigDict, mesh: Mesh | None = None) -> Tokenizer:
  """The checkpoint config.tokenizer names (workdir, step, use_ema), or errors naming the key.

  `mesh` as for Tokenizer.load.
  """
  checked_steps(tok_cfg)
  step = None if tok_cfg.step < 0 else tok_cfg.step
  return Tokenizer.load(tok_cfg.workdir, step=step, use_ema=tok_cfg.use_ema, mesh=mesh)


# --- The tokenizer a generator trains on (recorded in its workdir).

absolute = storage.absolute  # how a run records a tokenizer workdir (gs:// kept as given)


def read_record(workdir: str) -> dict | None:
  path = storage.join(workdir, TOKENIZER_RECORD)
  if not storage.exists(path):
    return None
  return storage.read_json(path)


def tokenizer_step_to_load(config: ml_collections.ConfigDict, workdir: str) -> int | None:
  """config.tokenizer.step; else the step this workdir trained on before; else None (newest).

  Pinning the step keeps a resumed run on the tokens it started with even if
  the tokenizer trained on (and saved newer checkpoints) in between.
  """
  tok_dir = config.tokenizer.workdir
  steps = checked_steps(config.tokenizer)
  if config.tokenizer.step >= 0:
    return config.tokenizer.step
  record = read_record(workdir)
  if record is None or record.get("workdir") != absolute(tok_dir):
    return None
  if record["step"] not in steps:
    raise ConfigError(
        f"this run trained on tokenizer step {record['step']} (recorded in "
        f"{storage.join(workdir, TOKENIZER_RECORD)}), which {tok_dir} no longer has (it has "
        f"{steps}); set config.tokenizer.step to go on with another one (its tokens differ)")
  return int(record["step"])


def load_for_generator(config: ml_collections.ConfigDict, workdir: str,
                       mesh: Mesh | None = None) -> Tokenizer:
  """The frozen C-ViViT, checked against the generator config and recorded in WORKDIR.

  `mesh`: where its weights go (Tokenizer.load; the trainer's global mesh, or
  by default each process's own devices).

  Process 0 chooses the step: tokenizer_step_to_load, or with none pinned or
  recorded the newest that restores among the steps it sees now. All
  processes load that one together (the tokenizer's own run may be saving
  newer steps meanwhile), process 0 writes the record (write_record), and
  after a barrier every other process reads it back from the (shared) workdir
  and checks it names the step it loaded (check_record).
  """
  tok_dir = config.tokenizer.workdir
  steps = checked_steps(config.tokenizer)  # a wrong tokenizer.workdir fails on every process alike
  step, newest = tokenizer_step_to_load(config, workdir), steps[-1]
  if jax.process_count() > 1:
    chosen = multihost_utils.broadcast_one_to_all(
        np.asarray([-1 if step is None else step, newest], np.int32))
    step, newest = (None if int(chosen[0]) < 0 else int(chosen[0])), int(chosen[1])
  tok = Tokenizer.load(tok_dir, step=step, newest=newest, mesh=mesh)
  check_tokenizer_match(config, tok.config, f"{tok_dir} (step {tok.step})")
  write_record(config, workdir, tok)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("phenaki_jax_tokenizer_record")
    if jax.process_index() != 0:
      check_record(config, workdir, tok)
  logging.info("frozen tokenizer: %s step %d", tok_dir, tok.step)
  return tok


def check_record(config: ml_collections.ConfigDict, workdir: str, tok: Tokenizer) -> None:
  """WORKDIR's record (written by process 0) names the tokenizer step `tok` is; a missing
  or different record means the processes do not share the workdir."""
  path = storage.join(workdir, TOKENIZER_RECORD)
  record = read_record(workdir)
  want = {"workdir": absolute(config.tokenizer.workdir), "step": int(tok.step)}
  if record is None or {k: record.get(k) for k in want} != want:
    raise RuntimeError(
        f"process {jax.process_index()} loaded tokenizer {want['workdir']} step {want['step']} "
        f"but {path} holds {'nothing' if record is None else record} after process 0 wrote "
        "it: every process needs the same --workdir, on storage all of them see (a gs:// "
        "bucket, or a shared file system)")


def load_recorded(generator_workdir: str, tokenizer_workdir: str | None = None,
                  mesh: Mesh | None = None) -> tuple[Tokenizer, str]:
  """(tokenizer, its workdir): the one a generator trained on, or `tokenizer_workdir`'s newest.

  `mesh` as for Tokenizer.load.
  """
  if tokenizer_workdir:
    return Tokenizer.load(tokenizer_workdir, mesh=mesh), tokenizer_workdir
  path = storage.join(generator_workdir, TOKENIZER_RECORD)
  record = read_record(generator_workdir)
  if record is None:
    raise FileNotFoundError(f"{path} is missing: it names the tokenizer this generator trained "
                            "on; pass tokenizer_workdir (config.generator.tokenizer_workdir)")
  steps = checkpointing.finalized_steps(record["workdir"])
  if record["step"] not in steps:
    raise FileNotFoundError(
        f"the generator in {generator_workdir} trained on tokenizer step {record['step']} of "
        f"{record['workdir']} (recorded in {path}), which that workdir no longer has (it has "
        f"{steps}); its tokens would decode wrongly with another step")
  return Tokenizer.load(record["workdir"], step=record["step"], mesh=mesh), record["workdir"]


def write_record(config: ml_collections.ConfigDict, workdir: str, tok: Tokenizer) -> None:
  if jax.process_index() == 0:
    storage.write_json(storage.join(workdir, TOKENIZER_RECORD),
                       {"workdir": absolute(config.tokenizer.workdir), "step": int(tok.step),
                        "codebook_size": int(tok.config.model.codebook_size)})


def token_grid_for(tok_config: ml_collections.ConfigDict, num_frames: int,
                   resolution: int) -> tuple[int, int, int]:
  """(token frames, h, w) the tokenizer makes of a num_frames × resolution² clip."""
  m = tok_config.model
  return (cvivit.num_token_frames(num_frames, m.temporal_patch_size),
          resolution // m.patch_size, resolution // m.patch_size)


def check_tokenizer_match(config: ml_collections.ConfigDict, tok_config: ml_collections.ConfigDict,
                          where: str) -> None:
  """The generator's vocabulary and token grid must be what the tokenizer produces."""
  tm, errors = tok_config.model, []
  if config.model.codebook_size != tm.codebook_size:
    errors.append(f"config.model.codebook_size={config.model.codebook_size} but the tokenizer "
                  f"has {tm.codebook_size} codes (its model.codebook_size): set "
                  f"config.model.codebook_size={tm.codebook_size} (the CPU default changed "
                  "from 1,024 to 256 codes on 2026-11-30)")
  if config.input.resolution != tok_config.input.resolution:
    errors.append(f"config.input.resolution={config.input.resolution} but the tokenizer was "
                  f"built for {tok_config.input.resolution}px frames (its input.resolution)")
  elif (config.input.num_frames - 1) % tm.temporal_patch_size:
    errors.append(f"config.input.num_frames={config.input.num_frames}: the tokenizer takes "
                  f"1 + k·{tm.temporal_patch_size} frames (its model.temporal_patch_size)")
  else:
    grid = token_grid_for(tok_config, config.input.num_frames, config.input.resolution)
    if tuple(config.model.token_grid) != grid:
      errors.append(
          f"config.model.token_grid={tuple(config.model.token_grid)} but the tokenizer (patch "
          f"{tm.patch_size}, temporal patch {tm.temporal_patch_size}) turns "
          f"config.input.num_frames={config.input.num_frames} frames of "
          f"config.input.resolution={config.input.resolution} into a "
          f"{grid[0]}x{grid[1]}x{grid[2]} token grid: set config.model.token_grid={grid}")
  story = config.input.get("story_ratio", 0.0) > 0 and config.input.data == "shapes"
  if story and any((k - 1) % tm.temporal_patch_size for k in config.input.story_context_frames):
    errors.append(f"config.input.story_context_frames={tuple(config.input.story_context_frames)}"
                  f": each must be 1 + m·{tm.temporal_patch_size} frames (the tokenizer's "
                  "model.temporal_patch_size) to tokenise to whole token frames")
  if errors:
    raise ConfigError(f"the generator config does not match the tokenizer in {where}: "
                      + "; ".join(errors))
