"""Speed of one trainer step: time, throughput, FLOPs, MFU, compile time, memory.

  python benchmarks/train_step.py --job=cvivit [--config=configs/cvivit.py:VARIANT]
      [--config.model.dtype=bfloat16 ...] [--steps=6 --warmup=2] [--json]
  python benchmarks/train_step.py --job=maskgit [--config=configs/maskgit.py:VARIANT]
      [--maskgit_input=codes|frames] [--tokenizer_config=configs/cvivit.py:VARIANT]
  python benchmarks/train_step.py --job=maskgit --config=benchmarks/bench_configs.py:gpu,maskgit \
      --tokenizer_config=benchmarks/bench_configs.py:gpu,cvivit --json   # issue 11's ~300M MFU
  python benchmarks/train_step.py --job=cvivit --config=benchmarks/bench_configs.py:gpu,cvivit_full \
      --at_step=1 --json      # the paper tokenizer, full objective (GAN 'on' phase), frames/s

The step is the trainer's own (benchmarks/_timing.py builds it with the
trainers' build_model / make_optimizer / abstract_state_and_shardings /
make_train_step, the same shardings and state donation), run on one random
batch. Prints the step time (median over the timed steps after warm-up, with
min/max), examples/s, tokens/s, frames/s, model FLOPs per step counted
analytically (formula printed; phenaki_jax/perf.py) next to XLA's
compiled.cost_analysis()['flops'] and their ratio, TFLOP/s per device, MFU
against phenaki_jax.perf.PEAK_BF16_TFLOPS (n/a on CPU unless --peak_tflops),
compile time, and peak device memory from compiled.memory_analysis().

The MaskGIT step defaults to pre-tokenised codes and cached text embeddings
(--maskgit_input=codes: the generator alone); 'frames' encodes clips with the
frozen C-ViViT inside the step as the default run does.
With LPIPS / I3D in the C-ViViT objective, --frozen_weights=random times the
step with random weights of their shapes (where the packages' weight files
are absent); the JSON says which were used, and the GAN phase timed ('off'
before gan.start_step, 'r1' on lazy-R1 steps (one in gan.r1_every), 'on').
Not a test: figures go to benchmarks/RESULTS.md with the command, machine and date.
"""
from __future__ import annotations

import json
import os
import sys

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_JOB = flags.DEFINE_enum("job", "cvivit", ["cvivit", "maskgit"], "Which trainer's step.")
_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (default configs/JOB.py).",
                                          lock_config=False)
_TOK_CONFIG = config_flags.DEFINE_config_file(
    "tokenizer_config", None, "MaskGIT only: the C-ViViT config of its frozen tokenizer "
    "(default configs/cvivit.py with the same variant).", lock_config=False)
_STEPS = flags.DEFINE_integer("steps", 6, "Timed steps.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps first.")
_JSON = flags.DEFINE_bool("json", False, "Print one JSON line instead of text.")
_PEAK = flags.DEFINE_float("peak_tflops", 0.0, "Peak TFLOP/s per device for MFU (0: the table).")
_INPUT = flags.DEFINE_enum("maskgit_input", "codes", ["codes", "frames"], "MaskGIT batch kind.")
_TEXT_WIDTH = flags.DEFINE_integer("text_width", 512, "Width of cached text embeddings (codes).")
_DRY_RUN = flags.DEFINE_bool(
    "dry_run", False, "Parse the flags, load and check the configs, count the parameters "
    "(abstractly), print one JSON line, and stop: nothing is compiled or run.")
_AT_STEP = flags.DEFINE_integer("at_step", 0, "C-ViViT: the step whose GAN/perceptual phase to time.")
_FROZEN = flags.DEFINE_enum(
    "frozen_weights", "auto", ["auto", "packaged", "random"],
    "C-ViViT with LPIPS / I3D: their pretrained weights ('packaged'), random values of the "
    "same shapes ('random': same step time, for machines without the weight files), or "
    "packaged where installed ('auto').")


def _variant_of(argv_flag: str) -> str:
  for a in sys.argv:
    if a.startswith(f"--{argv_flag}=") and ":" in a:
      return a.split(":", 1)[1]
  return ""


def step_config(config):
  from phenaki_jax.config import schema  # pylint: disable=g-import-not-at-top
  return schema.complete(config.copy_and_resolve_references())


def dry_run(job, config, tok_config) -> dict:
  """What --dry_run prints: the checked configs' key sizes and the parameter count."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from phenaki_jax.config import schema  # pylint: disable=g-import-not-at-top
  from phenaki_jax import sharding
  from phenaki_jax.train import cvivit_objective  # pylint: disable=g-import-not-at-top
  from phenaki_jax import train_state  # pylint: disable=g-import-not-at-top
  c = step_config(config)
  i, m = c.input, c.model
  out = {"dry_run": True, "job": job, "batch": i.batch_size, "model_dtype": m.dtype,
         "attention_impl": m.attention_impl or "auto"}
  mesh = sharding.make_mesh(c.mesh.shape)
  with sharding.use_mesh(mesh, c.logical_axis_rules):
    if job == "cvivit":
      schema.validate_cvivit(c, jax.device_count(), jax.process_count())
      model = train_state.build_cvivit(c)
      shapes = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct(
          (1, i.num_frames, i.resolution, i.resolution, 3), jnp.float32))
      out.update(clip=f"{i.num_frames}x{i.resolution}x{i.resolution}",
                 gan_phase=cvivit_objective.gan_phase(c, _AT_STEP.value),
                 perceptual=cvivit_objective.perceptual_on(c, _AT_STEP.value))
    else:
      if not c.tokenizer.workdir:
        c.tokenizer.workdir = "(random weights)"
      schema.validate_maskgit(c, jax.device_count(), jax.process_count())
      schema.validate_cvivit(step_config(tok_config), jax.device_count(),
                                    jax.process_count())
      model = train_state.build_maskgit(c)
      grid, length = tuple(m.token_grid), c.text.max_length
      shapes = jax.eval_shape(model.init, jax.random.key(0),
                              jax.ShapeDtypeStruct((1,) + grid, jnp.int32),
                              jax.ShapeDtypeStruct((1, length, _TEXT_WIDTH.value), jnp.float32),
                              jax.ShapeDtypeStruct((1, length), jnp.bool_))
      out.update(token_grid=grid, text_len=length, text_width=_TEXT_WIDTH.value,
                 maskgit_input=_INPUT.value)
  out["params"] = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(shapes["params"])))
  return out


def main(_):
  import _timing  # pylint: disable=g-import-not-at-top
  from tests.helpers import load_config  # pylint: disable=g-import-not-at-top

  job = _JOB.value
  config = _CONFIG.value or load_config(job)
  if config.get("job") != job:
    raise app.UsageError(f"--config is a {config.get('job')!r} config; --job={job}")
  tok_config = None
  if job == "maskgit":
    tok_config = _TOK_CONFIG.value or load_config("cvivit", _variant_of("config"))
  if _DRY_RUN.value:
    print(json.dumps(dict(_timing.header(), **dry_run(job, config, tok_config))))
    return
  if job == "cvivit":
    step = _timing.cvivit_step(config, at_step=_AT_STEP.value, frozen_weights=_FROZEN.value)
  else:
    step = _timing.maskgit_step(config, tok_config, input_mode=_INPUT.value,
                                text_width=_TEXT_WIDTH.value)
  compiled = _timing.compile_step(step)
  times, donated = _timing.time_step(step, _STEPS.value, _WARMUP.value)
  summary = _timing.summarize(step, times, compiled, donated, _PEAK.value or None)
  summary.update(_timing.header())
  summary["model_dtype"] = step_config(config).model.dtype
  if job == "maskgit":
    summary["maskgit_input"] = _INPUT.value
  else:
    summary["gan_phase"], summary["perceptual"] = step.static
    summary["frozen_weights"] = step.frozen_weights
    summary["resolution"] = config.input.resolution
  if _JSON.value:
    print(json.dumps(summary))
    return
  print(f"{summary['command']}\n  device {summary['device']}, {summary['date']}, "
        f"load average {summary['load_average']:.2f}")
  _timing.print_summary(summary)


if __name__ == "__main__":
  app.run(main)
