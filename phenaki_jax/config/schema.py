"""Every job's config: its defaults composed from the sections beside this file, and its checks.

`configs/*.py` start from these defaults and change values for their variants.
A job checks the config it is given against the same defaults (`complete`), so
a key it does not know (a typo, a stale key) and an impossible value fail at
start-up, before anything compiles, with a message that names the key.

The sections (each its defaults next to its check): loop.py, mesh.py,
input.py, optimizer.py, text.py, sampling.py, protocol.py, compute.py, and the
models' cvivit.py and maskgit.py; prepare.py the prepare job's settings;
sizes.py the model sizes; rules.py the logical-axis rules; errors.py
ConfigError and the check helpers; args.py the grammar of `configs/X.py:ARG`.
"""
from __future__ import annotations

import ml_collections

from phenaki_jax import storage
from phenaki_jax.config import compute
from phenaki_jax.config import cvivit
from phenaki_jax.config import errors
from phenaki_jax.config import input as input_section
from phenaki_jax.config import loop
from phenaki_jax.config import maskgit
from phenaki_jax.config import mesh
from phenaki_jax.config import optimizer
from phenaki_jax.config import prepare
from phenaki_jax.config import protocol
from phenaki_jax.config import rules
from phenaki_jax.config import sampling
from phenaki_jax.config import text

ConfigError = errors.ConfigError
TOKENIZER_RULES = rules.TOKENIZER_RULES
GENERATOR_RULES = rules.GENERATOR_RULES
TEXT_ENCODERS = text.TEXT_ENCODERS
eval_protocol_defaults = protocol.recon_defaults

# ---------------------------------------------------------------------------
# The C-ViViT tokenizer trainer (configs/cvivit.py).

def cvivit_defaults() -> ml_collections.ConfigDict:
  """Defaults of the C-ViViT tokenizer trainer (the CPU-friendly default run)."""
  c = ml_collections.ConfigDict()
  c.job = "cvivit"
  c.update(loop.defaults(total_steps=2500))
  # The eval (eval_every_steps) scores the EMA weights on held-out clips: PSNR,
  # SSIM, LPIPS, reconstruction FVD, codebook usage (phenaki_jax/eval/recon.py);
  # num_eval_examples of them go into the reconstruction PNG.
  c.eval_protocol = protocol.recon_defaults()
  # Few clips: the eval must stay cheap next to the steps between evals.
  c.eval_protocol.num_clips = 32
  c.eval_protocol.batch_size = 8
  c.update(mesh.defaults(rules.TOKENIZER_RULES))
  c.input = input_section.defaults()
  c.model = cvivit.model_defaults()
  c.loss = cvivit.loss_defaults()
  c.gan = cvivit.gan_defaults()
  c.codebook = cvivit.codebook_defaults()
  c.optimizer = optimizer.defaults(learning_rate=1e-3, warmup_steps=100, weight_decay=1e-4,
                                   io_lr_multiplier=10.0)
  return c


def validate_cvivit(config: ml_collections.ConfigDict, num_devices: int,
                    process_count: int = 1) -> None:
  """Impossible values fail here, naming the key, before any compilation."""
  errors.positive_ints(config, [*cvivit.POSITIVE_KEYS, *input_section.POSITIVE_KEYS,
                                *loop.POSITIVE_KEYS])
  loop.check(config)
  cvivit.check_model(config)
  input_section.check(config)
  compute.check(config)
  cvivit.check_codebook(config)
  cvivit.check_objective(config)
  loop.check_ema(config)
  optimizer.check_schedule(config)
  mesh_shape = mesh.check(config, num_devices, process_count)
  cvivit.check_mesh(config, mesh_shape)
  if config.eval_every_steps > 0:
    # The evaluator splits its batches over the mesh as training does.
    mesh.check_batch(config, "eval_protocol.batch_size", config.eval_protocol.batch_size,
                     mesh_shape, process_count)


# ---------------------------------------------------------------------------
# The MaskGIT generator trainer (configs/maskgit.py).

def maskgit_defaults() -> ml_collections.ConfigDict:
  """Defaults of the MaskGIT generator trainer (the CPU-friendly default run)."""
  c = ml_collections.ConfigDict()
  c.job = "maskgit"
  c.update(loop.defaults(total_steps=2000))
  # The eval (eval_every_steps): held-out masked-token loss/accuracy (with and
  # without text, raw and EMA weights).
  c.update(maskgit.task_defaults())
  c.update(mesh.defaults(rules.GENERATOR_RULES))
  # The trained C-ViViT (frozen): its newest checkpoint, or tokenizer.step.
  # The step used is recorded in WORKDIR/tokenizer.json, and a resumed run
  # keeps it even if the tokenizer trained on meanwhile.
  c.tokenizer = cvivit.ref_defaults(use_ema=False)
  c.input = input_section.generator_defaults()
  c.model = maskgit.model_defaults()
  c.text = text.defaults()
  # 5e-4: the lowest held-out loss at step 1,000 of four rates (benchmarks/RESULTS.md).
  c.optimizer = optimizer.defaults(learning_rate=5e-4, warmup_steps=200, weight_decay=1e-2,
                                   io_lr_multiplier=1.0)
  return c


def validate_maskgit(config: ml_collections.ConfigDict, num_devices: int,
                     process_count: int = 1) -> None:
  """Impossible values fail here, naming the key, before anything loads or compiles.

  What depends on the tokenizer (codebook size, token grid, resolution) is
  checked once it is loaded (train_maskgit.check_tokenizer_match).
  """
  errors.positive_ints(config, [*maskgit.POSITIVE_KEYS, *input_section.POSITIVE_KEYS,
                                *text.POSITIVE_KEYS, *loop.POSITIVE_KEYS,
                                *loop.EVAL_POSITIVE_KEYS])
  loop.check(config)
  loop.check_eval(config)
  maskgit.check_grid(config)
  cvivit.check_ref(config)
  t = config.tokenizer
  errors.require(isinstance(t.step, int) and t.step >= -1, "tokenizer.step", t.step,
                 "must be a checkpoint step, or -1 for newest")
  maskgit.check_guidance(config)
  loop.check_ema(config)
  maskgit.check_tasks(config)
  text.check(config)
  compute.check(config)
  input_section.check(config)
  optimizer.check(config)
  mesh_shape = mesh.check(config, num_devices, process_count)
  mesh.check_splits(config, mesh_shape, {**maskgit.mesh_splits(config),
                                         **text.mesh_splits(config)})


# ---------------------------------------------------------------------------
# Evaluation jobs (configs/eval.py). The checks of eval_generated and
# eval_compare are in phenaki_jax/eval/eval_generated.py and eval_compare.py.

def eval_tokenizer_defaults() -> ml_collections.ConfigDict:
  """Defaults of the tokenizer evaluation (configs/eval.py:tokenizer)."""
  c = ml_collections.ConfigDict()
  c.job = "eval_tokenizer"
  # Picks the held-out clips (pipeline.eval_videos): fixed, so reports of
  # different tokenizers are computed on the same clips.
  c.seed = 0
  c.num_grid_clips = 8  # clips in the input-vs-reconstruction PNG
  c.tokenizer = cvivit.ref_defaults(use_ema=True)
  c.input = input_section.eval_defaults()
  c.protocol = protocol.recon_defaults()
  return c


def validate_eval_tokenizer(config: ml_collections.ConfigDict) -> None:
  """What can be checked before the tokenizer loads; its shapes are checked after."""
  cvivit.check_ref(config, example=True)
  t = config.tokenizer
  errors.require(isinstance(t.step, int) and t.step >= -1, "tokenizer.step", t.step,
                 "must be a checkpoint step, or -1 for the newest")
  input_section.check_eval(config)
  errors.require(isinstance(config.num_grid_clips, int) and config.num_grid_clips >= 0,
                 "num_grid_clips", config.num_grid_clips, "must be >= 0")
  protocol.check_recon(config)


def eval_generated_defaults() -> ml_collections.ConfigDict:
  """Defaults of the generated-video evaluation (phenaki_jax/eval/eval_generated.py)."""
  c = ml_collections.ConfigDict()
  c.job = "eval_generated"
  c.name = ""  # the label in report.json and comparisons; '' : the generated path's name
  # Required. A folder of mp4/GIF files (a sample job's output, captions from
  # its samples.json; story.json marks a story), or a configs/maskgit.py
  # workdir, which is sampled here.
  c.generated = ""
  # 'shapes' (held-out built-in clips), prepared ArrayRecord shards (a
  # configs/prepare.py output folder, a shard folder, a glob or a comma list),
  # 'tfds:NAME' (an ArrayRecord TFDS dataset, keys under tfds.*), or a folder of videos.
  c.reference = "shapes"
  # For a folder: a JSON {file or stem: caption} or a JSONL manifest of
  # {"path", "caption"}; '' reads samples.json, captions.json or NAME.txt sidecars.
  c.captions = ""

  # Sampling a MaskGIT workdir: prompts, else the balanced built-in shapes
  # prompts, cycled to the protocol's clip count; batches as the sample job's.
  c.update(sampling.prompt_defaults())
  c.generator = maskgit.ref_defaults(workdir=False)
  c.sampling = sampling.defaults()

  c.tfds = ml_collections.ConfigDict()  # reference='tfds:NAME'
  c.tfds.split = "test"
  c.tfds.data_dir = ""
  c.tfds.frames_key = "video"
  c.tfds.caption_key = "caption"

  c.protocol = protocol.generated_defaults()

  # CLIP score when clip.path is set (phenaki_jax/eval/clip_score.py).
  c.clip = ml_collections.ConfigDict()
  c.clip.path = ""
  c.clip.merges_path = ""
  c.clip.batch_size = 8
  return c


def eval_compare_defaults() -> ml_collections.ConfigDict:
  """Defaults of the report comparison (phenaki_jax/eval/eval_compare.py)."""
  c = ml_collections.ConfigDict()
  c.job = "eval_compare"
  c.reports = ""  # required: report.json paths, comma-separated
  c.names = ""  # column names, comma-separated; '' : each report's name
  return c


def eval_prediction_defaults(preset: str = "bair") -> ml_collections.ConfigDict:
  """Defaults of frame prediction (phenaki_jax/eval/eval_prediction.py), `preset` of
  protocol.PREDICTION_PRESETS."""
  c = ml_collections.ConfigDict()
  c.job = "eval_prediction"
  c.generator = maskgit.ref_defaults(workdir=True)
  # The held-out clips: '' and -1 take what the generator trained on (its
  # input, or its tokenizer's when it read pre-tokenised codes), as the
  # tokenizer evaluation does; clips must hold context + predicted frames.
  c.input = ml_collections.ConfigDict()
  c.input.data = ""  # 'shapes', 'shards' or 'tfds'
  c.input.video_shards = ""
  c.input.eval_shards = ""
  c.input.tfds_video = ""
  c.input.tfds_split = ""
  c.input.tfds_eval_split = ""
  c.input.tfds_data_dir = ""
  # Or a folder of videos (mp4, GIF, ...): each one's first frames at
  # protocol.fps, resized and centre-cropped as training data is; captions
  # from captions.json, NAME.txt sidecars or this file.
  c.folder = ""
  c.captions = ""
  c.sampling = sampling.defaults()
  c.batch_size = 8  # clips predicted (and scored, and I3D-featured) at once
  c.num_grid_clips = 4  # clips in the PNG (rows: real, predicted)
  c.protocol = protocol.prediction_defaults(preset)
  return c


def validate_eval_prediction(config: ml_collections.ConfigDict) -> None:
  """What can be checked before the generator loads; its geometry is checked after."""
  maskgit.check_ref(config)
  protocol.check_prediction(config)
  errors.positive_ints(config, ["batch_size"])
  errors.require(isinstance(config.num_grid_clips, int) and config.num_grid_clips >= 0,
                 "num_grid_clips", config.num_grid_clips, "must be >= 0")
  errors.require(config.input.data in ("",) + input_section.KINDS, "input.data",
                 config.input.data, "must be 'shapes', 'shards' or 'tfds' ('' takes the "
                 "generator's)")
  if config.folder:
    errors.require(storage.isdir(config.folder), "folder", config.folder, "no such folder")
    errors.require(not config.input.data, "input.data", config.input.data,
                   f"give either config.folder ({config.folder!r}) or config.input.*, not both")
  errors.require(not config.captions or storage.exists(config.captions), "captions",
                 config.captions, "no such file")


# ---------------------------------------------------------------------------
# The sampling job (configs/sample.py).

def sample_defaults() -> ml_collections.ConfigDict:
  """Defaults of the sampling job (phenaki_jax/sampling/sample.py)."""
  c = ml_collections.ConfigDict()
  c.job = "sample"
  c.generator = maskgit.ref_defaults(workdir=True)
  # What to sample: these prompts, the lines of prompts_file, and shapes_eval
  # prompts of the built-in grammar (scored; see phenaki_jax/eval/shapes_score.py).
  c.update(sampling.prompt_defaults())
  c.shapes_eval = 0
  c.samples_per_prompt = 1
  c.num_frames = -1  # 1 + k·temporal_patch up to the trained length; -1: the trained length
  # A story instead of separate clips (phenaki_jax/sampling/story.py): a
  # YAML/JSON storyboard file, or prompts separated by ';', one segment each.
  # Either one replaces the prompts above.
  c.storyboard = ""
  c.story = ""
  c.story_defaults = sampling.story_defaults()
  # A start for every video (or the story): an image (image-to-video) or a
  # video file whose last start_frames frames are continued
  # (phenaki_jax/sampling/start.py); -1: the longest start the generator takes.
  c.start = ""
  c.start_frames = -1
  c.start_in_output = True  # the start's frames open the output unchanged
  c.sampling = sampling.defaults()
  c.output = ml_collections.ConfigDict()
  c.output.formats = "mp4,gif"  # comma list of 'mp4', 'gif'
  c.output.fps = 8.0
  return c


def validate_sample(config: ml_collections.ConfigDict) -> None:
  """What can be checked before the generator loads."""
  maskgit.check_ref(config)
  errors.require(isinstance(config.prompts, str), "prompts", config.prompts,
                 "must be a string of prompts separated by ';'")
  errors.require(isinstance(config.shapes_eval, int) and config.shapes_eval >= 0, "shapes_eval",
                 config.shapes_eval, "must be >= 0")
  errors.positive_ints(config, ["samples_per_prompt", "batch_size"])
  errors.require(isinstance(config.num_frames, int) and (config.num_frames == -1
                                                         or config.num_frames >= 1),
                 "num_frames", config.num_frames, "must be >= 1, or -1 for the trained length")
  formats = [f.strip() for f in config.output.formats.split(",") if f.strip()]
  errors.require(bool(formats) and all(f in ("mp4", "gif") for f in formats), "output.formats",
                 config.output.formats, "must be a comma list of 'mp4' and 'gif'")
  errors.require(config.output.fps > 0, "output.fps", config.output.fps, "must be > 0")
  errors.require(not (config.storyboard and config.story), "story", config.story,
                 "give either config.story or config.storyboard, not both")
  errors.require(isinstance(config.start_frames, int) and (config.start_frames == -1
                                                           or config.start_frames >= 1),
                 "start_frames", config.start_frames, "must be >= 1, or -1 for the longest start")
  errors.require(not (config.start and config.num_frames != -1), "num_frames",
                 config.num_frames, f"a start (config.start={config.start!r}) continues to the "
                 "trained length: leave num_frames at -1")
  if config.storyboard:
    errors.require(storage.exists(config.storyboard), "storyboard", config.storyboard,
                   "no such file")
  sampling.check_story(config)


# ---------------------------------------------------------------------------
# Pre-tokenising clips for the generator (configs/pretokenize.py).

def pretokenize_defaults() -> ml_collections.ConfigDict:
  """Defaults of the offline tokenisation job (phenaki_jax/data/pretokenize.py)."""
  c = ml_collections.ConfigDict()
  c.job = "pretokenize"
  c.seed = 0  # the shapes source's seed, as the trainer's config.seed
  c.tokenizer = cvivit.ref_defaults(use_ema=True)
  # What to encode: the generator's input keys (video_ratio 0 / 1 skips a kind).
  c.input = input_section.defaults()
  # The generator's text keys: a frozen T5 ('t5', text.frozen) has its
  # embeddings cached in the records; the byte encoder trains, so only the
  # captions are stored.
  c.text = text.defaults()
  # Examples per kind; -1: the whole source (the built-in one is endless: set them).
  c.num_video_examples = -1
  c.num_image_examples = -1
  c.num_eval_examples = 64  # held-out clips (all of a smaller held-out split); 0: none
  c.batch_size = 16
  c.records_per_shard = 10_000
  return c


def validate_pretokenize(config: ml_collections.ConfigDict) -> None:
  i = config.input
  cvivit.check_ref(config)
  input_section.check(config)
  errors.positive_ints(config, ["batch_size", "records_per_shard"])
  for key, wanted in (("num_video_examples", i.video_ratio > 0),
                      ("num_image_examples", i.video_ratio < 1)):
    value = config[key]
    errors.require(isinstance(value, int) and value >= -1 and value != 0, key, value,
                   "must be a positive count, or -1 for the whole source")
    if i.data == "shapes" and wanted:
      errors.require(value > 0, key, value, "must be set for the built-in data (it is endless)")
  errors.require(config.num_eval_examples >= 0, "num_eval_examples", config.num_eval_examples,
                 "must be >= 0")
  text.check_encoder(config)


# ---------------------------------------------------------------------------
# Preparing clip shards (configs/prepare.py; its values are checked by
# phenaki_jax/data/prepare.py Settings.from_config).

def prepare_defaults() -> ml_collections.ConfigDict:
  """Defaults of the prepare job (phenaki_jax/data/prepare.py)."""
  c = prepare.defaults()
  c.job = "prepare"
  return c


# ---------------------------------------------------------------------------
# Filling a config from its job's defaults.

# The jobs `complete` knows. (prepare checks its own keys: data/prepare.py run.)
DEFAULTS = {
    "cvivit": cvivit_defaults,
    "maskgit": maskgit_defaults,
    "eval_tokenizer": eval_tokenizer_defaults,
    "eval_generated": eval_generated_defaults,
    "eval_compare": eval_compare_defaults,
    "eval_prediction": eval_prediction_defaults,
    "sample": sample_defaults,
    "pretokenize": pretokenize_defaults,
}


def complete(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Rejects unknown keys and fills missing ones from the job's defaults."""
  job = config.get("job")
  if job not in DEFAULTS:
    raise ConfigError(f"config.job={job!r}: unknown job; expected one of {sorted(DEFAULTS)}")
  defaults = DEFAULTS[job]()
  given, known = errors.flat_keys(config), errors.flat_keys(defaults)
  unknown = sorted(k for k in given if k not in known
                   and not any(k.startswith(p + ".") for p in known))
  if unknown:
    raise ConfigError("unknown config key(s) for job '%s': %s" % (
        job, ", ".join(f"config.{k}" for k in unknown)))
  merged = defaults
  with merged.unlocked():
    for k, v in given.items():
      errors.set_key(merged, k, v)
  return merged
