"""Which prompt words does a trained generator use? (phenaki_jax/eval/text_sensitivity.py)

  python benchmarks/text_sensitivity.py --generator=runs/maskgit [--step=1000]
      [--num_clips=48] [--mask_ratios=0.5,0.9,1.0]

Prints one JSON object: per mask ratio, the NLL (nats per masked object token)
under the true caption and how much more it costs with the size, colour,
shape or motion word swapped, or with no text. 0 = the word is ignored. Use
it to tell a generator that does not listen to a word from one that listens
but cannot draw it (sampled accuracy: configs/sample.py:shapes_eval). Not a
test: figures go to benchmarks/RESULTS.md with the command, machine and date.
"""
from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_GENERATOR = flags.DEFINE_string("generator", "runs/maskgit", "A configs/maskgit.py workdir.")
_STEP = flags.DEFINE_integer("step", -1, "Checkpoint step; -1: the newest.")
_CLIPS = flags.DEFINE_integer("num_clips", 48, "Held-out built-in clips.")
_RATIOS = flags.DEFINE_list("mask_ratios", ["0.5", "0.9", "1.0"], "Fractions of tokens masked.")
_RAW = flags.DEFINE_bool("raw_weights", False, "Score the raw weights instead of the EMA.")


def main(argv):
  del argv
  from phenaki_jax.eval import text_sensitivity  # pylint: disable=g-import-not-at-top
  from phenaki_jax.generator import Generator  # pylint: disable=g-import-not-at-top
  try:
    ratios = [float(r) for r in _RATIOS.value]
  except ValueError:
    raise app.UsageError(f"--mask_ratios={','.join(_RATIOS.value)}: not numbers") from None
  if not ratios or not all(0 < r <= 1 for r in ratios):
    raise app.UsageError(f"--mask_ratios={','.join(_RATIOS.value)}: each must be in (0, 1]")
  if _CLIPS.value < 1:
    raise app.UsageError(f"--num_clips={_CLIPS.value}: must be >= 1")
  start = time.time()
  gen = Generator.load(_GENERATOR.value, step=None if _STEP.value < 0 else _STEP.value,
                       use_ema=not _RAW.value)
  result = text_sensitivity.measure(gen, num_clips=_CLIPS.value,
                                    mask_ratios=ratios)
  print(json.dumps({"generator": os.path.abspath(_GENERATOR.value), "step": gen.step,
                    "weights": "raw" if _RAW.value else "ema", "num_clips": _CLIPS.value,
                    **result, "seconds": round(time.time() - start, 1)}, indent=2))


if __name__ == "__main__":
  app.run(main)
