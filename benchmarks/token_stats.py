"""How learnable a tokenizer's codes are (phenaki_jax/eval/token_stats.py).

  python benchmarks/token_stats.py --tokenizer=runs/cvivit [--step=2500] [--num_clips=96]

Encodes held-out built-in clips and prints one JSON object: distinct codes and
entropy (nats) of the background and of the object tokens, and the
background's entropy at a fixed token position. Background entropy is noise
every generator on these tokens has to model. Not a test: figures go to
benchmarks/RESULTS.md with the command, machine and date.
"""
from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_TOKENIZER = flags.DEFINE_string("tokenizer", "runs/cvivit", "A configs/cvivit.py workdir.")
_STEP = flags.DEFINE_integer("step", -1, "Checkpoint step; -1: the newest.")
_CLIPS = flags.DEFINE_integer("num_clips", 96, "Held-out built-in clips.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the held-out clips.")


def main(argv):
  del argv
  if _CLIPS.value < 1:
    raise app.UsageError(f"--num_clips={_CLIPS.value}: must be >= 1")
  import numpy as np  # pylint: disable=g-import-not-at-top
  from phenaki_jax.eval import text_sensitivity, token_stats  # pylint: disable=g-import-not-at-top
  from phenaki_jax.tokenizer import Tokenizer  # pylint: disable=g-import-not-at-top
  start = time.time()
  tok = Tokenizer.load(_TOKENIZER.value, step=None if _STEP.value < 0 else _STEP.value)
  m = tok.config.model
  _, clips = text_sensitivity.held_out_clips(_CLIPS.value, int(tok.config.input.num_frames),
                                             int(tok.config.input.resolution), _SEED.value)
  codes = np.concatenate([np.asarray(tok.encode(clips[i:i + 16]))
                          for i in range(0, len(clips), 16)])
  stats = token_stats.code_statistics(
      codes, token_stats.object_token_mask(clips, m.patch_size, m.temporal_patch_size))
  print(json.dumps({"tokenizer": os.path.abspath(_TOKENIZER.value), "step": tok.step,
                    "codebook_size": int(m.codebook_size), "num_clips": _CLIPS.value,
                    **stats, "seconds": round(time.time() - start, 1)}, indent=2))


if __name__ == "__main__":
  app.run(main)
