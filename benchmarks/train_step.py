"""Speed of one trainer step: time, throughput, FLOPs, MFU, compile time, memory.

  python benchmarks/train_step.py --job=cvivit [--config=configs/cvivit.py:VARIANT]
      [--config.model.dtype=bfloat16 ...] [--steps=6 --warmup=2] [--json]
  python benchmarks/train_step.py --job=maskgit [--config=configs/maskgit.py:VARIANT]
      [--maskgit_input=codes|frames] [--tokenizer_config=configs/cvivit.py:VARIANT]

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
_AT_STEP = flags.DEFINE_integer("at_step", 0, "C-ViViT: the step whose GAN/perceptual phase to time.")


def _variant_of(argv_flag: str) -> str:
  for a in sys.argv:
    if a.startswith(f"--{argv_flag}=") and ":" in a:
      return a.split(":", 1)[1]
  return ""


def main(_):
  import _timing  # pylint: disable=g-import-not-at-top
  from tests.helpers import load_config  # pylint: disable=g-import-not-at-top

  job = _JOB.value
  config = _CONFIG.value or load_config(job)
  if config.get("job") != job:
    raise app.UsageError(f"--config is a {config.get('job')!r} config; --job={job}")
  if job == "cvivit":
    step = _timing.cvivit_step(config, at_step=_AT_STEP.value)
  else:
    tok_config = _TOK_CONFIG.value or load_config("cvivit", _variant_of("config"))
    step = _timing.maskgit_step(config, tok_config, input_mode=_INPUT.value,
                                text_width=_TEXT_WIDTH.value)
  compiled = _timing.compile_step(step)
  times, donated = _timing.time_step(step, _STEPS.value, _WARMUP.value)
  summary = _timing.summarize(step, times, compiled, donated, _PEAK.value or None)
  summary.update(_timing.header())
  if job == "maskgit":
    summary["maskgit_input"] = _INPUT.value
  if _JSON.value:
    print(json.dumps(summary))
    return
  print(f"{summary['command']}\n  device {summary['device']}, {summary['date']}, "
        f"load average {summary['load_average']:.2f}")
  _timing.print_summary(summary)


if __name__ == "__main__":
  app.run(main)
