"""Trains the MaskGIT generator on the tokens of a frozen C-ViViT: a linear trainer.

Setup -> Tokenizer (frozen; checked against the config) -> Text encoder -> Mesh
-> Input -> Model & optimizer (eval_shape) -> Shardings -> Restore or Init ->
Update step -> Evals -> Loop, as in train_cvivit.

One update step, all on device: encode the uint8 clips with the frozen
tokenizer (or take precomputed codes), pad an image batch's single token frame
to the token grid, mask a fraction γ(r) of each example's tokens with
r ~ U(0, 1), replace the text of `text_drop_rate` of the examples by the empty
text (classifier-free guidance), and take the cross-entropy on the masked
tokens only. A generator with long-term memory (model.memory_token_frames)
also gets memory tokens, dropped for memory.drop_rate of the examples (see
phenaki_jax/train/memory_task.py).

The batch dict (global arrays, leading axis = examples):
  frames        uint8 (B, T, H, W, 3): T = input.num_frames (videos) or 1 (images)
  codes         int32 (B, t, h, w), t <= model.token_grid[0]: precomputed tokens,
                used instead of `frames` when present (the pre-tokenised path)
  token_frames  optional int32 (B,): real token frames per example, for
                batches that mix images and videos; default t for all
  text_ids      int32 (B, L) and text_mask bool (B, L): captions tokenised on the host
  text_embeddings  optional float (B, L, D): precomputed outputs of a frozen
                text encoder, used instead of text_ids (with text_mask)
  memory_frames optional uint8 (B, 1 + (m−1)·t_p, H, W, 3): a story clip's
                object rendered apart from it, encoded into its memory tokens
"""
from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from phenaki_jax import batch_log, checkpointing, ema, metrics, optimizers, sharding
from phenaki_jax.config import schema
from phenaki_jax import perf
from phenaki_jax.config.schema import ConfigError
from phenaki_jax.data import pipeline
from phenaki_jax.models import cvivit, maskgit, t5
from phenaki_jax.text import t5_weights, text_tokenizers
from phenaki_jax.sampling import mask_schedule
from phenaki_jax.tokenizer import Tokenizer
from phenaki_jax.train import memory_task
from phenaki_jax.train_state import GeneratorState
# Generic trainer pieces, shared with the tokenizer trainer.
from phenaki_jax.train.train_cvivit import (NonFiniteTrainingError, PreemptionWatch,  # noqa: F401
                                            check_nonfinite_streak, restore_or_set_aside,
                                            save_config)

# Where a run records the tokenizer checkpoint it trains on.
TOKENIZER_RECORD = "tokenizer.json"
# Masking-progress buckets for metrics: r in [0, .25), ..., [.75, 1]; small r
# masks almost everything (the first decoding steps), large r almost nothing.
R_BUCKETS = ("00-25", "25-50", "50-75", "75-100")
_BUCKET_STATS = "bucket_stats"


# --- The frozen tokenizer.

def _abs(path: str) -> str:
  return path if "://" in path else os.path.abspath(path)


def _recorded_tokenizer(workdir: str) -> dict | None:
  path = os.path.join(workdir, TOKENIZER_RECORD)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def tokenizer_step_to_load(config: ml_collections.ConfigDict, workdir: str) -> int | None:
  """config.tokenizer.step; else the step this workdir trained on before; else None (newest).

  Pinning the step keeps a resumed run on the tokens it started with even if
  the tokenizer trained on (and saved newer checkpoints) in between.
  """
  tok_dir = config.tokenizer.workdir
  steps = checkpointing.finalized_steps(tok_dir)
  if not steps:
    raise ConfigError(
        f"config.tokenizer.workdir={tok_dir!r}: no C-ViViT checkpoint in {tok_dir}/checkpoints; "
        f"train one first: python -m phenaki_jax.main --config=configs/cvivit.py "
        f"--workdir={tok_dir}")
  if config.tokenizer.step >= 0:
    if config.tokenizer.step not in steps:
      raise ConfigError(f"config.tokenizer.step={config.tokenizer.step}: {tok_dir} has "
                        f"checkpoint steps {steps}")
    return config.tokenizer.step
  record = _recorded_tokenizer(workdir)
  if record is None or record.get("workdir") != _abs(tok_dir):
    return None
  if record["step"] not in steps:
    raise ConfigError(
        f"this run trained on tokenizer step {record['step']} (recorded in "
        f"{os.path.join(workdir, TOKENIZER_RECORD)}), which {tok_dir} no longer has (it has "
        f"{steps}); set config.tokenizer.step to go on with another one (its tokens differ)")
  return int(record["step"])


def load_tokenizer(config: ml_collections.ConfigDict, workdir: str) -> Tokenizer:
  """The frozen C-ViViT, its step chosen by tokenizer_step_to_load."""
  tok = Tokenizer.load(config.tokenizer.workdir, step=tokenizer_step_to_load(config, workdir))
  logging.info("frozen tokenizer: %s step %d", config.tokenizer.workdir, tok.step)
  return tok


def record_tokenizer(config: ml_collections.ConfigDict, workdir: str, tok: Tokenizer) -> None:
  if jax.process_index() == 0:
    with open(os.path.join(workdir, TOKENIZER_RECORD), "w") as f:
      json.dump({"workdir": _abs(config.tokenizer.workdir), "step": int(tok.step),
                 "codebook_size": int(tok.config.model.codebook_size)}, f, indent=2)


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


# --- The text encoder.

@dataclasses.dataclass(frozen=True)
class TextEncoder:
  """Host tokenizer + encoder module, and where the encoder's parameters live.

  Attributes:
    tokenizer: turns captions into ids on the host.
    module: the T5 encoder.
    trainable: parameters are in the train state (trained, EMA'd,
      checkpointed) under params['text_encoder']; otherwise they are a frozen
      input of the step.
    pretrained: numpy parameters loaded from config.text.t5_path, or None.
  """
  tokenizer: text_tokenizers.TextTokenizer
  module: t5.T5Encoder
  trainable: bool
  pretrained: Any = None

  @property
  def width(self) -> int:
    return self.module.d_model


def _find_sentencepiece(checkpoint: str) -> str:
  folder = checkpoint if os.path.isdir(checkpoint) else os.path.dirname(checkpoint)
  if os.path.exists(os.path.join(folder, "spiece.model")):
    return os.path.join(folder, "spiece.model")
  found = sorted(glob.glob(os.path.join(folder, "*.model")))
  if len(found) != 1:
    raise ConfigError(
        f"config.text.vocab_path='': found {len(found)} SentencePiece *.model files next to "
        f"{checkpoint} (need spiece.model or exactly one); set config.text.vocab_path")
  return found[0]


def load_t5(path: str, vocab_path: str, dtype: Any) -> tuple[t5.T5Encoder, Any,
                                                              text_tokenizers.TextTokenizer]:
  """A Hugging Face folder (*.safetensors) or a T5X checkpoint with its SentencePiece model."""
  if not os.path.exists(path):
    raise ConfigError(f"config.text.t5_path={path!r}: does not exist")
  try:
    if os.path.isdir(path) and glob.glob(os.path.join(path, "*.safetensors")):
      module, params, tokenizer = t5_weights.load_t5_encoder(path, dtype=dtype)
      if vocab_path:
        tokenizer = text_tokenizers.SentencePieceTokenizer(vocab_path)
    else:
      params, t5_config = t5_weights.load_t5x_params(path)
      module = t5_config.make_module(dtype=dtype)
      tokenizer = text_tokenizers.SentencePieceTokenizer(vocab_path or _find_sentencepiece(path))
  except (ValueError, FileNotFoundError, NotADirectoryError, NotImplementedError) as e:
    raise ConfigError(f"config.text.t5_path={path!r}: {e}") from None
  if tokenizer.vocab_size > module.vocab_size:
    raise ConfigError(f"config.text.t5_path={path!r}: its tokenizer emits {tokenizer.vocab_size} "
                      f"ids but the embedding has only {module.vocab_size} rows")
  return module, params, tokenizer


def build_text_encoder(text_cfg: ml_collections.ConfigDict) -> TextEncoder:
  dtype = jnp.dtype(text_cfg.dtype)
  if text_cfg.encoder == "byte":
    b = text_cfg.byte_encoder
    # ByT5's vocabulary size (bytes + specials, padded to 384).
    sizes = t5.T5EncoderConfig(vocab_size=t5.BYT5_TINY.vocab_size, d_model=b.width,
                               d_kv=b.head_dim, d_ff=b.mlp_dim, num_heads=b.num_heads,
                               num_layers=b.num_layers)
    return TextEncoder(text_tokenizers.ByteTokenizer(), sizes.make_module(dtype=dtype),
                       trainable=True)
  module, params, tokenizer = load_t5(text_cfg.t5_path, text_cfg.vocab_path, dtype)
  return TextEncoder(tokenizer, module, trainable=not text_cfg.frozen, pretrained=params)


def tokenize_captions(batch: Mapping[str, Any], tokenizer: text_tokenizers.TextTokenizer,
                      max_length: int) -> dict[str, np.ndarray]:
  """Host side: batch['caption'] (B,) strings -> text_ids / text_mask (B, max_length).

  A batch with cached text embeddings (pre-tokenised data) has no captions.
  """
  if "caption" not in batch:
    return dict(batch)
  out = {k: v for k, v in batch.items() if k != "caption"}
  ids, mask = tokenizer.encode_batch([str(c) for c in batch["caption"]], max_length)
  out["text_ids"], out["text_mask"] = ids, mask
  return out


def encode_text(text: TextEncoder, params: Any, frozen_text_params: Any,
                batch: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
  """(context (B, L, D), mask (B, L)) from precomputed embeddings or the encoder."""
  if "text_embeddings" in batch:
    return batch["text_embeddings"], batch["text_mask"].astype(jnp.bool_)
  text_params = params["text_encoder"] if text.trainable else frozen_text_params
  context, mask = text.module.apply({"params": text_params}, batch["text_ids"],
                                    batch["text_mask"])
  if not text.trainable:
    context = jax.lax.stop_gradient(context)
  return context, mask


# --- Pre-tokenised input (configs/pretokenize.py).

def check_token_shards(config: ml_collections.ConfigDict, tok: Tokenizer,
                       text: TextEncoder) -> None:
  """The shards must hold this tokenizer's codes, and embeddings of this text encoder."""
  from phenaki_jax.data import pretokenize  # pylint: disable=g-import-not-at-top
  where = config.input.token_shards
  meta = pretokenize.read_metadata(where)
  made_by, errors = meta["tokenizer"], []
  if made_by["workdir"] != _abs(config.tokenizer.workdir) or made_by["step"] != tok.step:
    errors.append(f"they hold the codes of tokenizer {made_by['workdir']} step {made_by['step']}"
                  f", but config.tokenizer.workdir={config.tokenizer.workdir!r} loaded step "
                  f"{tok.step}; set config.tokenizer.workdir / config.tokenizer.step to match")
  for split, info in meta["splits"].items():
    if split == "video" and tuple(info["token_grid"]) != tuple(config.model.token_grid):
      errors.append(f"their video token grid is {tuple(info['token_grid'])}, "
                    f"config.model.token_grid={tuple(config.model.token_grid)}")
  cached = meta["text"]
  if cached.get("cached"):
    wanted = {"text.encoder": ("t5", config.text.encoder),
              "text.frozen": (True, bool(config.text.frozen)),
              "text.t5_path": (cached["t5_path"], _abs(config.text.t5_path) if config.text.t5_path else ""),
              "text.max_length": (cached["max_length"], config.text.max_length)}
    for key, (theirs, ours) in wanted.items():
      if theirs != ours:
        errors.append(f"their text embeddings were made with {key}={theirs!r}, the config "
                      f"has {ours!r}")
    if cached["width"] != text.width:
      errors.append(f"their text embeddings are {cached['width']} wide, the encoder makes "
                    f"{text.width}")
  if errors:
    raise ConfigError(f"config.input.token_shards={where!r} do not fit this run: "
                      + "; ".join(errors))
  logging.info("pre-tokenised input %s: %s; text embeddings %s", where,
               {k: v["records"] for k, v in meta["splits"].items()},
               "cached" if cached.get("cached") else "computed from captions")


def held_out_batch(config: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
  """The held-out eval examples: clips + captions, or their pre-tokenised records."""
  n = config.num_eval_examples
  if config.input.data != "tokens":
    frames, captions = pipeline.eval_clips(config.input, seed=config.seed, count=n)
    return {"frames": frames, "caption": np.asarray(captions)}
  from phenaki_jax.data import pretokenize  # pylint: disable=g-import-not-at-top
  where = config.input.token_shards
  split = "eval" if os.path.isdir(os.path.join(where, "eval")) else "video"
  if split == "video":
    logging.warning("%s has no held-out 'eval' split (only the built-in data gets one): the "
                    "eval loss is measured on %d training clips", where, n)
  source = pretokenize.TokenShardSource(where, split, config.text.max_length)
  if len(source) < n:
    raise ConfigError(f"config.num_eval_examples={n}: {where}/{split} holds {len(source)}")
  examples = [source[i] for i in range(n)]
  batch = {"codes": np.stack([e["codes"] for e in examples])}
  if "text_embeddings" in examples[0]:
    batch["text_embeddings"] = np.stack([e["text_embeddings"] for e in examples])
    batch["text_mask"] = np.stack([e["text_mask"] for e in examples])
  else:
    batch["caption"] = np.asarray([e["caption"] for e in examples])
  return batch


# --- Model, state and shardings.

def build_generator(config: ml_collections.ConfigDict) -> maskgit.MaskGitTransformer:
  t, h, w = tuple(config.model.token_grid)
  return maskgit.from_config(config.model, codebook_size=config.model.codebook_size,
                             max_token_frames=t, grid_size=(h, w))


def make_init_fn(generator: maskgit.MaskGitTransformer, text: TextEncoder,
                 tx: optax.GradientTransformation, config: ml_collections.ConfigDict):
  """rng -> GeneratorState with logically boxed leaves (eval_shape it for shardings)."""
  t, h, w = tuple(config.model.token_grid)
  length = config.text.max_length

  def init(rng: jax.Array) -> GeneratorState:
    gen_rng, text_rng = jax.random.split(rng)
    params = {"generator": generator.init(
        gen_rng, jnp.zeros((1, t, h, w), jnp.int32), jnp.zeros((1, length, text.width)),
        jnp.ones((1, length), jnp.bool_))["params"]}
    if text.trainable:
      ids = jnp.ones((1, length), jnp.int32)
      params["text_encoder"] = text.module.init(text_rng, ids)["params"]
    return GeneratorState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=tx.init(params), ema_params=params,
                          nonfinite_streak=jnp.zeros((), jnp.int32))
  return init


def abstract_state_and_shardings(config: ml_collections.ConfigDict,
                                 generator: maskgit.MaskGitTransformer, text: TextEncoder,
                                 tx: optax.GradientTransformation, mesh: jax.sharding.Mesh):
  """(abstract unboxed state, its NamedShardings, unboxing init fn)."""
  init = make_init_fn(generator, text, tx, config)
  abstract_boxed = jax.eval_shape(init, jax.random.key(0))
  shardings = sharding.tree_shardings(abstract_boxed, mesh, config.logical_axis_rules)
  return sharding.strip_boxes(abstract_boxed), shardings, lambda rng: nn.unbox(init(rng))


def place(tree: Any, shardings: Any) -> Any:
  """Host (numpy) values -> global arrays with `shardings`; works on several processes."""
  def one(x, s):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, s, lambda index: x[index])
  return jax.tree.map(one, tree, shardings)


def frozen_inputs(tok: Tokenizer, text: TextEncoder, config: ml_collections.ConfigDict,
                  mesh: jax.sharding.Mesh) -> tuple[dict[str, Any], dict[str, Any]]:
  """The step's frozen inputs (tokenizer params, frozen text encoder) and their shardings.

  The tokenizer is replicated: its encoder is small next to the generator,
  and its head / width sizes then need not divide the generator's mesh.
  """
  tok_params = jax.device_get(tok.params)
  _, shardings = frozen_input_specs(tok_params, text, config, mesh)
  values = {"tokenizer": tok_params, "text_encoder": {}}
  if not text.trainable:
    values["text_encoder"] = text.pretrained
  return place(values, shardings), shardings


def frozen_input_specs(tok_params: Any, text: TextEncoder, config: ml_collections.ConfigDict,
                       mesh: jax.sharding.Mesh) -> tuple[dict[str, Any], dict[str, Any]]:
  """(abstract shapes of the frozen text encoder's params, the frozen inputs' shardings).

  `tok_params` may be values or ShapeDtypeStructs: only its structure is
  used. Shapes only, so the memory pre-flight (phenaki_jax/preflight.py)
  compiles the same step without loading any weights.
  """
  shardings = {"tokenizer": jax.tree.map(lambda _: sharding.replicated(mesh), tok_params),
               "text_encoder": {}}
  text_shapes = {}
  if not text.trainable:
    boxed = jax.eval_shape(text.module.init, jax.random.key(0),
                           jnp.ones((1, config.text.max_length), jnp.int32))["params"]
    shardings["text_encoder"] = sharding.tree_shardings(boxed, mesh, config.logical_axis_rules)
    text_shapes = sharding.strip_boxes(boxed)
  return text_shapes, shardings


# --- Masking and the loss.

def step_rng(seed: int, step: jax.Array | int) -> jax.Array:
  """The step's randomness depends on (seed, step) only: a resumed run repeats it."""
  return jax.random.fold_in(jax.random.key(seed), step)


def split_step_rng(rng: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(mask rng, text-drop rng) of a step."""
  mask_rng, drop_rng = jax.random.split(rng)
  return mask_rng, drop_rng


def sample_prefix_frames(rng: jax.Array, real_frames: jax.Array,
                         probability: float | jax.Array) -> jax.Array:
  """int32 (B,): token frames given unmasked as a story's context; 0 for most examples.

  With `probability` an example with t ≥ 2 real token frames gets a prefix of
  k ~ U{1, …, t−1} frames (never all of them, so something is left to learn).
  """
  use_rng, k_rng = jax.random.split(rng)
  real = real_frames.astype(jnp.int32)
  use = jax.random.bernoulli(use_rng, probability, real.shape) & (real >= 2)
  k = jax.random.randint(k_rng, real.shape, 1, jnp.maximum(real, 2))
  return jnp.where(use, k, 0)


def corrupt_prefix(rng: jax.Array, tokens: jax.Array, prefix_frames: jax.Array,
                   fraction: float, codebook_size: int) -> jax.Array:
  """Replaces `fraction` of the prefix tokens by random codes, so the model
  learns to continue a context it cannot trust blindly (re-encoded frames are
  not the tokens it sampled)."""
  b = tokens.shape[0]
  frame = jax.lax.broadcasted_iota(jnp.int32, tokens.shape, 1)
  in_prefix = frame < prefix_frames.reshape((b,) + (1,) * (tokens.ndim - 1))
  flip_rng, code_rng = jax.random.split(rng)
  flip = in_prefix & jax.random.bernoulli(flip_rng, fraction, tokens.shape)
  random_codes = jax.random.randint(code_rng, tokens.shape, 0, codebook_size)
  return jnp.where(flip, random_codes, tokens)


def text_drop_mask(rng: jax.Array, batch_size: int, rate: float | jax.Array) -> jax.Array:
  """bool (B,): True for the examples whose text is replaced by the empty text."""
  return jax.random.bernoulli(rng, rate, (batch_size,))


def pad_token_grid(codes: jax.Array, num_token_frames: int, mask_id: int,
                   token_frames: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Codes (B, t, h, w) -> tokens (B, T, h, w) and the bool region of real tokens.

  An image is a clip of one token frame: the other token frames are [MASK]
  inputs outside the loss region, so it trains on its first-frame tokens only
  (and the model sees it as the first frame of a clip yet to be generated).
  `token_frames` (B,) marks fewer real frames per example, for mixed batches.
  """
  b, t = codes.shape[:2]
  if t > num_token_frames:
    raise ValueError(f"codes have {t} token frames; the generator takes at most "
                     f"{num_token_frames} (config.model.token_grid)")
  tokens = jnp.pad(codes.astype(jnp.int32), ((0, 0), (0, num_token_frames - t), (0, 0), (0, 0)),
                   constant_values=mask_id)
  real = jnp.full((b,), t, jnp.int32)
  if token_frames is not None:
    real = jnp.minimum(token_frames.astype(jnp.int32), t)
  region = jnp.arange(num_token_frames)[None, :] < real[:, None]
  region = jnp.broadcast_to(region[:, :, None, None], tokens.shape)
  return jnp.where(region, tokens, mask_id), region


def token_cross_entropy(logits: jax.Array, targets: jax.Array,
                        label_smoothing: float) -> tuple[jax.Array, jax.Array]:
  """Per-position (cross-entropy, correct) for float32 logits (..., V).

  A one-hot product rather than a gather, so a vocab-sharded logits array
  reduces across its shards without being gathered.
  """
  vocab = logits.shape[-1]
  lse = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.sum(logits * jax.nn.one_hot(targets, vocab, dtype=logits.dtype), axis=-1)
  ce = lse - target_logit
  if label_smoothing > 0:
    # Smoothed labels (1-ε)·onehot + ε/V give (1-ε)·CE + ε·(lse - mean logit).
    ce = (1.0 - label_smoothing) * ce + label_smoothing * (lse - jnp.mean(logits, axis=-1))
  return ce, jnp.argmax(logits, axis=-1) == targets


def _progress_from_ratio(ratio: jax.Array, schedule: str) -> jax.Array:
  """The r whose γ(r) is `ratio` (inverse of mask_schedule.mask_ratio)."""
  ratio = jnp.clip(ratio, 0.0, 1.0)
  if schedule == "cosine":
    return jnp.arccos(ratio) * (2.0 / math.pi)
  if schedule == "linear":
    return 1.0 - ratio
  return jnp.sqrt(1.0 - ratio)  # square


def bucket_stats(ce: jax.Array, correct: jax.Array, masked: jax.Array, region: jax.Array,
                 schedule: str) -> dict[str, jax.Array]:
  """Sums of loss / correct / count over masked tokens, per bucket of r.

  Sums (not means): a bucket can be empty in a step; the host divides after
  summing a whole log interval (finish_bucket_metrics).
  """
  b = masked.shape[0]
  weight = masked.reshape(b, -1).astype(jnp.float32)
  eligible = region.reshape(b, -1).sum(axis=1)
  r = _progress_from_ratio(weight.sum(axis=1) / jnp.maximum(eligible, 1), schedule)
  bucket = jnp.clip(jnp.floor(r * len(R_BUCKETS)), 0, len(R_BUCKETS) - 1).astype(jnp.int32)
  ce, correct = ce.reshape(b, -1), correct.reshape(b, -1).astype(jnp.float32)
  out = {}
  for k, name in enumerate(R_BUCKETS):
    w = weight * (bucket == k)[:, None]
    out[f"{_BUCKET_STATS}/{name}/loss_sum"] = jnp.sum(ce * w)
    out[f"{_BUCKET_STATS}/{name}/correct_sum"] = jnp.sum(correct * w)
    out[f"{_BUCKET_STATS}/{name}/count"] = jnp.sum(w)
  return out


def finish_bucket_metrics(scalars: dict[str, float]) -> dict[str, float]:
  """Turns interval sums into train/by_r/BUCKET/{loss,masked_accuracy}."""
  for name in R_BUCKETS:
    prefix = f"{_BUCKET_STATS}/{name}/"
    loss_sum, correct_sum, count = (scalars.pop(prefix + k)
                                    for k in ("loss_sum", "correct_sum", "count"))
    if count > 0:
      scalars[f"train/by_r/{name}/loss"] = loss_sum / count
      scalars[f"train/by_r/{name}/masked_accuracy"] = correct_sum / count
  return scalars


def training_inputs(rng: jax.Array, tokens: jax.Array, region: jax.Array, *, schedule: str,
                    mask_id: int, codebook_size: int, prefix_probability: float = 0.0,
                    prefix_corrupt_fraction: float = 0.0,
                    given_prefix: jax.Array | None = None,
                    memory_frames: jax.Array | None = None
                    ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(model inputs, bool masked = loss weight, prefix token frames (B,)) of a step.

  Masks γ(r) of each example's maskable tokens (in `region`, outside its
  story prefix); the prefix is given as context (corrupted when asked). A
  story clip's own context (`given_prefix` token frames, > 0) is its prefix.
  `memory_frames` (B,): an example's first token frames that are its own
  long-term memory; those not in its prefix are [MASK] in the input and
  outside the loss (see memory_task.memory_inputs).
  """
  mask_rng, _ = split_step_rng(rng)
  # Its own stream (fold_in): the mask and text-drop draws stay as they were.
  prefix_rng, corrupt_rng = jax.random.split(jax.random.fold_in(rng, 2))
  prefix_frames = jnp.zeros((tokens.shape[0],), jnp.int32)
  if prefix_probability > 0:
    prefix_frames = sample_prefix_frames(prefix_rng, region[:, :, 0, 0].sum(axis=1),
                                         prefix_probability)
  if given_prefix is not None:
    prefix_frames = jnp.where(given_prefix > 0, given_prefix.astype(jnp.int32), prefix_frames)
  frozen = prefix_frames if memory_frames is None else jnp.maximum(prefix_frames, memory_frames)
  masked = mask_schedule.sample_mask(mask_rng, tokens.shape, schedule, loss_region=region,
                                     num_frozen_frames=frozen)
  context = tokens
  if prefix_corrupt_fraction > 0 and (prefix_probability > 0 or given_prefix is not None):
    context = corrupt_prefix(corrupt_rng, tokens, prefix_frames, prefix_corrupt_fraction,
                             codebook_size)
  inputs = jnp.where(masked, mask_id, context)
  if memory_frames is not None:
    frame = jax.lax.broadcasted_iota(jnp.int32, tokens.shape, 1)
    per_example = lambda x: x.reshape((-1,) + (1,) * (tokens.ndim - 1))
    hidden = (frame >= per_example(prefix_frames)) & (frame < per_example(memory_frames))
    inputs = jnp.where(hidden, mask_id, inputs)
  return inputs, masked, prefix_frames


def compute_losses(generator: maskgit.MaskGitTransformer, text: TextEncoder, params: Any,
                   frozen_text_params: Any, batch: Mapping[str, jax.Array], codes: jax.Array,
                   rng: jax.Array, *, text_drop_rate: float | jax.Array, label_smoothing: float,
                   schedule: str, prefix_probability: float = 0.0,
                   prefix_corrupt_fraction: float = 0.0,
                   memory_drop_rate: float | jax.Array = 1.0
                   ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Masked-token cross-entropy and its logged parts.

  With `prefix_probability`, an example's first k token frames are given
  unmasked (a story's re-encoded context) and the loss is on the rest; a
  `prefix_corrupt_fraction` of those context tokens is replaced at random.
  A generator with memory gets memory tokens (batch['memory_codes'], else
  the clip's own; see memory_task.memory_inputs), dropped at
  `memory_drop_rate` (the default 1 gives none, as the held-out eval has it).
  Parts under 'bucket_stats/' are interval sums, not metrics (see
  finish_bucket_metrics).
  """
  tokens, region = pad_token_grid(codes, generator.max_token_frames, generator.mask_id,
                                  batch.get("token_frames"))
  _, drop_rng = split_step_rng(rng)
  memory, memory_present, own_memory = None, None, None
  if generator.memory_token_frames:
    # Its own stream (fold_in), as the prefix's: the other draws stay as they were.
    memory, memory_present, own_memory = memory_task.memory_inputs(
        jax.random.fold_in(rng, 3), tokens, region,
        memory_token_frames=generator.memory_token_frames, drop_rate=memory_drop_rate,
        given=batch.get("memory_codes"))
  inputs, masked, prefix_frames = training_inputs(
      rng, tokens, region, schedule=schedule, mask_id=generator.mask_id,
      codebook_size=generator.codebook_size, prefix_probability=prefix_probability,
      prefix_corrupt_fraction=prefix_corrupt_fraction,
      given_prefix=batch.get("prefix_token_frames"), memory_frames=own_memory)
  context, context_mask = encode_text(text, params, frozen_text_params, batch)
  dropped = text_drop_mask(drop_rng, tokens.shape[0], text_drop_rate)
  # All-False: the generator attends to its learned null token only.
  context_mask = context_mask & ~dropped[:, None]
  memory_args = () if memory is None else (memory, memory_present)
  logits = generator.apply({"params": params["generator"]}, inputs, context, context_mask,
                           *memory_args)
  # Padding positions hold [MASK] (= V, not a class); they carry no weight.
  targets = jnp.where(region, tokens, 0)
  ce, correct = token_cross_entropy(logits, targets, label_smoothing)
  weight = masked.astype(jnp.float32)
  count = jnp.maximum(jnp.sum(weight), 1.0)
  loss = jnp.sum(ce * weight) / count
  b = tokens.shape[0]
  ratio = weight.reshape(b, -1).sum(1) / jnp.maximum(region.reshape(b, -1).sum(1), 1)
  parts = {
      "train/loss": loss,
      "train/masked_accuracy": jnp.sum(correct * weight) / count,
      "train/mask_ratio": jnp.mean(ratio),
      "train/text_dropped_fraction": jnp.mean(dropped.astype(jnp.float32)),
      "train/prefix_fraction": jnp.mean((prefix_frames > 0).astype(jnp.float32)),
  }
  if memory is not None:
    parts["train/memory_fraction"] = jnp.mean(memory_present.astype(jnp.float32))
  parts.update(bucket_stats(ce, correct, masked, region, schedule))
  return loss, parts


def batch_codes(tokenizer_model: cvivit.CViViT, tokenizer_params: Any,
                batch: Mapping[str, jax.Array]) -> jax.Array:
  """Precomputed batch['codes'], else the frozen tokenizer's codes of batch['frames']."""
  if "codes" in batch:
    return batch["codes"].astype(jnp.int32)
  video = pipeline.to_model_input(batch["frames"])
  _, aux = tokenizer_model.apply({"params": tokenizer_params}, video,
                                 method=tokenizer_model.encode)
  return jax.lax.stop_gradient(aux["codes"]).astype(jnp.int32)


# --- Steps.

def make_train_step(generator: maskgit.MaskGitTransformer, text: TextEncoder,
                    tokenizer_model: cvivit.CViViT, tx: optax.GradientTransformation,
                    config: ml_collections.ConfigDict):
  schedule = optimizers.learning_rate_schedule(config.optimizer, config.total_steps)

  def train_step(state: GeneratorState, batch: dict[str, jax.Array], frozen: dict[str, Any]):
    codes = batch_codes(tokenizer_model, frozen["tokenizer"], batch)
    if "prefix_frames" in batch:  # story clips: K context frames -> token frames
      tp = tokenizer_model.temporal_patch_size
      batch = {**batch, "prefix_token_frames": 1 + (batch["prefix_frames"] - 1) // tp}
    if "memory_frames" in batch and generator.memory_token_frames:
      # Story clips: their object rendered apart -> memory tokens.
      batch = {**batch, "memory_codes": batch_codes(tokenizer_model, frozen["tokenizer"],
                                                    {"frames": batch["memory_frames"]})}
    rng = step_rng(config.seed, state.step)
    loss_fn = lambda p: compute_losses(
        generator, text, p, frozen["text_encoder"], batch, codes, rng,
        text_drop_rate=config.text_drop_rate, label_smoothing=config.loss.label_smoothing,
        schedule=config.mask_schedule, prefix_probability=config.prefix.probability,
        prefix_corrupt_fraction=config.prefix.corrupt_fraction,
        memory_drop_rate=config.memory.drop_rate)
    (_, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema_params = ema.update(state.ema_params, params, state.step, config.ema_decay)
    grad_norm = optax.global_norm(grads)
    # A NaN/Inf loss, gradient or update skips the step (params, optimizer
    # state and EMA unchanged), as in the tokenizer trainer.
    finite = (jnp.isfinite(parts["train/loss"]) & jnp.isfinite(grad_norm)
              & jnp.isfinite(optax.global_norm(params)))
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_streak = jnp.where(finite, 0, state.nonfinite_streak + 1)
    parts["train/grad_norm"] = grad_norm
    parts["train/learning_rate"] = schedule(state.step)
    parts["train/nonfinite_step_fraction"] = 1.0 - finite.astype(jnp.float32)
    parts["nonfinite_streak"] = new_streak
    new_state = GeneratorState(
        step=state.step + 1,
        params=keep(params, state.params),
        opt_state=keep(opt_state, state.opt_state),
        ema_params=keep(ema_params, state.ema_params),
        nonfinite_streak=new_streak)
    return new_state, parts

  return train_step


def make_eval_step(generator: maskgit.MaskGitTransformer, text: TextEncoder,
                   tokenizer_model: cvivit.CViViT, config: ml_collections.ConfigDict):
  """Held-out masked-token loss; the masks are the same at every eval."""
  def eval_step(params: Any, frozen: dict[str, Any], batch: dict[str, jax.Array],
                text_drop_rate: jax.Array):
    codes = batch_codes(tokenizer_model, frozen["tokenizer"], batch)
    _, parts = compute_losses(
        generator, text, params, frozen["text_encoder"], batch, codes,
        jax.random.key(config.seed + 1), text_drop_rate=text_drop_rate, label_smoothing=0.0,
        schedule=config.mask_schedule)
    return {"loss": parts["train/loss"], "masked_accuracy": parts["train/masked_accuracy"]}
  return eval_step


def _batch_kind(batch: Mapping[str, Any]) -> str:
  if "prefix_frames" in batch:
    return "story"
  frames = batch["codes"] if "codes" in batch else batch["frames"]
  return "video" if frames.shape[1] > 1 else "image"


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       stop_after_step: int | None = None) -> dict[str, Any]:
  """Trains until config.total_steps, resuming from workdir's checkpoints.

  `stop_after_step` ends this run early with a checkpoint, as a preemption
  would, without changing anything that depends on total_steps.
  """
  # --- Setup: a bad config fails here, before anything loads or compiles.
  config = schema.complete(config)
  schema.validate_maskgit(config, jax.device_count(), jax.process_count())
  perf.setup_compilation_cache(config.model.compilation_cache_dir)
  os.makedirs(workdir, exist_ok=True)
  rules = config.logical_axis_rules

  # --- The frozen tokenizer, checked against the config; the text encoder.
  tok = load_tokenizer(config, workdir)
  check_tokenizer_match(config, tok.config, f"{config.tokenizer.workdir} (step {tok.step})")
  record_tokenizer(config, workdir, tok)
  text = build_text_encoder(config.text)
  if config.input.data == "tokens":
    check_token_shards(config, tok, text)
  save_config(config, workdir)
  writer = metrics.create_writer(workdir)

  # --- Mesh.
  mesh = sharding.make_mesh(config.mesh.shape)
  logging.info("mesh %s over %d devices (%d processes)", dict(mesh.shape), jax.device_count(),
               jax.process_count())
  batch_sharding = sharding.batch_sharding(mesh, rules)
  replicated = sharding.replicated(mesh)

  # --- Input: clips with captions; captions become ids on the host.
  memory_frames = 0  # story clips carry memory frames of their object for a memory generator
  if config.model.memory_token_frames:
    memory_frames = cvivit.num_frames_of(config.model.memory_token_frames,
                                         int(tok.config.model.temporal_patch_size))
  train_iter = iter(pipeline.make_train_dataset(
      config.input, seed=config.seed, process_index=jax.process_index(),
      process_count=jax.process_count(), keep_caption=True,
      text_max_length=config.text.max_length, story_memory_frames=memory_frames))

  def to_device(local_batch: Mapping[str, Any], where: Any) -> dict[str, jax.Array]:
    host = tokenize_captions(local_batch, text.tokenizer, config.text.max_length)
    return sharding.host_to_global(host, where)

  with sharding.use_mesh(mesh, rules):
    # --- Model & optimizer, shapes only.
    generator = build_generator(config)
    tx = optimizers.make_optimizer(config.optimizer, config.total_steps)
    abstract_state, state_shardings, init_fn = abstract_state_and_shardings(
        config, generator, text, tx, mesh)
    for name, tree in abstract_state.params.items():
      logging.info("%s: %.2fM trained parameters", name,
                   sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree)) / 1e6)
    frozen, frozen_shardings = frozen_inputs(tok, text, config, mesh)

    # --- Restore, or initialise already sharded.
    ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"),
                                      max_to_keep=config.keep_checkpoints,
                                      async_save=config.async_checkpointing)
    restored = restore_or_set_aside(ckpt, checkpointing.abstract_with_shardings(
        abstract_state, state_shardings), train_iter, config)
    if restored is None:
      state = jax.jit(init_fn, out_shardings=state_shardings)(jax.random.key(config.seed))
      if text.trainable and text.pretrained is not None:
        # A trainable T5 starts from its checkpoint; two copies, as both are donated.
        where = state_shardings.params["text_encoder"]
        state = state.replace(
            params={**state.params, "text_encoder": place(text.pretrained, where)},
            ema_params={**state.ema_params, "text_encoder": place(text.pretrained, where)})
      start_step = 0
      logging.info("no checkpoint in %s: starting from scratch", workdir)
    else:
      state, start_step = restored
      logging.info("resumed from step %d", start_step)

    # --- Update step: one jitted function, explicit shardings, state donated.
    train_step = jax.jit(make_train_step(generator, text, tok.model, tx, config),
                         in_shardings=(state_shardings, batch_sharding, frozen_shardings),
                         out_shardings=(state_shardings, replicated), donate_argnums=(0,))
    eval_step = jax.jit(make_eval_step(generator, text, tok.model, config),
                        in_shardings=(state_shardings.params, frozen_shardings, replicated,
                                      replicated),
                        out_shardings=replicated)
    eval_batch = None
    if config.eval_every_steps > 0:
      eval_batch = to_device(held_out_batch(config), replicated)

    def run_eval(step: int) -> dict[str, float]:
      scalars = {}
      for name, params, drop in (("eval", state.params, 0.0), ("eval/ema", state.ema_params, 0.0),
                                 ("eval/no_text", state.params, 1.0)):
        out = jax.device_get(eval_step(params, frozen, eval_batch, jnp.float32(drop)))
        scalars.update({f"{name}/{k}": float(v) for k, v in out.items()})
      writer.write_scalars(step, scalars)
      logging.info("eval at step %d: %s", step,
                   " ".join(f"{k}={v:.4g}" for k, v in scalars.items()))
      return scalars

    # --- Loop.
    progress = metrics.ProgressLogger(config.total_steps, start_step)
    accumulator = metrics.StepAccumulator()
    preemption = PreemptionWatch(ckpt)
    pending_streak = None
    last_saved = start_step if restored is not None else None
    last_scalars: dict[str, float] = {}
    eval_scalars: dict[str, float] = {}
    hashes = batch_log.BatchHashLog(workdir, start_step)
    for step in range(start_step + 1, config.total_steps + 1):
      local = next(train_iter)
      kind = _batch_kind(local)
      hashes.add(step, kind, local)
      state, step_metrics = train_step(state, to_device(local, batch_sharding), frozen)
      step_metrics = dict(step_metrics)
      # Checked one step late: by now that value is computed, so no stall.
      if pending_streak is not None:
        check_nonfinite_streak(int(pending_streak), step - 1, config.max_consecutive_nonfinite,
                               last_saved)
      pending_streak = step_metrics.pop("nonfinite_streak")
      accumulator.add(kind, step_metrics)
      is_last = step == config.total_steps
      if step % config.log_every_steps == 0 or is_last:
        last_scalars = finish_bucket_metrics(
            accumulator.means(per_kind=("train/loss", "train/masked_accuracy")))
        rate = progress.steps_per_sec(step)
        last_scalars["perf/steps_per_sec"] = rate
        last_scalars["perf/examples_per_sec"] = rate * config.input.batch_size
        writer.write_scalars(step, last_scalars)
        progress.log(step, last_scalars, rate)
        hashes.flush()
      if eval_batch is not None and (step % config.eval_every_steps == 0 or is_last):
        eval_scalars = run_eval(step)
      stopping = stop_after_step is not None and step >= stop_after_step
      preempted = preemption.reached(step)
      if step % config.checkpoint_every_steps == 0 or is_last or stopping or preempted:
        if step % config.checkpoint_every_steps == 0 or is_last or preempted:
          check_nonfinite_streak(int(pending_streak), step, config.max_consecutive_nonfinite,
                                 last_saved)
        hashes.flush()
        ckpt.save(step, state, train_iter, config, force=preempted)
        last_saved = step
      if preempted:
        ckpt.wait()
        logging.warning("preempted (SIGTERM) at step %d: checkpoint committed, exiting; run the "
                        "same command again to resume", step)
        break
      if stopping:
        logging.info("stopping after step %d as asked; run again to resume", step)
        break
    preemption.close()
    ckpt.close()
    writer.flush()
  return {"step": int(state.step), "train": last_scalars, "eval": eval_scalars,
          "state": state}
