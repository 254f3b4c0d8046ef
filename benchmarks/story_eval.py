"""Story quality of a trained generator on built-in shapes stories.

  python benchmarks/story_eval.py --generator=runs/maskgit [--stories=8] [--segments=4]
      [--context_frames=-1] [--guidance_scale=3.0] [--num_steps=12]
      [--memory_guidance_scale=0] [--seam_blending]

Samples --stories storyboards of --segments segments (one object, a new
direction each segment; phenaki_jax/eval/story_metrics.py), each segment one
window's worth of new frames, and prints JSON: per-segment prompt accuracy
(the shapes scorer), whether later segments keep the first segment's colour
and shape, and the seam ratio (frame change at window starts over the change
inside windows; 1 = seamless). Run it once per generator (e.g. trained with
and without the story task) and compare. The experimental switches are
compared the same way, each against the same generator without it:
--memory_guidance_scale > 0 (a generator trained with
model.memory_token_frames > 0; the story's first token frame guides every
later window) and --seam_blending (a random split inside the context at
every decoding step). Not a test: figures go to benchmarks/RESULTS.md with
the command, machine and date.
"""
from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_GENERATOR = flags.DEFINE_string("generator", "runs/maskgit", "A configs/maskgit.py workdir.")
_STORIES = flags.DEFINE_integer("stories", 8, "Storyboards to sample.")
_SEGMENTS = flags.DEFINE_integer("segments", 4, "Segments per story.")
_CONTEXT = flags.DEFINE_integer("context_frames", -1, "K; -1: about half the window.")
_GUIDANCE = flags.DEFINE_float("guidance_scale", 3.0, "Classifier-free guidance scale.")
_STEPS = flags.DEFINE_integer("num_steps", 12, "Decoding steps per window.")
_MEMORY = flags.DEFINE_float("memory_guidance_scale", 0.0,
                             "Long-term memory guidance (a generator trained with memory); "
                             "0: off.")
_SCHEDULE = flags.DEFINE_enum("guidance_schedule", "constant",
                              ["constant", "increasing", "decreasing"],
                              "How the guidance scale moves over the decoding steps.")
_SEAM = flags.DEFINE_bool("seam_blending", False, "Randomised blending of the seams.")
_SAVE = flags.DEFINE_string("save_gif", "", "Write the first story here as a GIF.")


def main(_):
  import numpy as np
  from phenaki_jax.data import video_io
  from phenaki_jax.eval import story_metrics
  from phenaki_jax.generator import Generator, SamplingOptions
  from phenaki_jax.sampling import story

  gen = Generator.load(_GENERATOR.value)
  options = SamplingOptions(num_steps=_STEPS.value, guidance_scale=_GUIDANCE.value,
                            memory_guidance_scale=_MEMORY.value, seam_blending=_SEAM.value,
                            guidance_schedule=_SCHEDULE.value)
  options.check()
  scores, start = [], time.perf_counter()
  for i in range(_STORIES.value):
    prompts = story_metrics.shapes_storyboard(_SEGMENTS.value, seed=i)
    frames = []
    result = story.generate_story(gen, story.parse_segments(prompts), sink=frames.append,
                                  options=options, seed=i, context_frames=_CONTEXT.value)
    video = np.concatenate(frames)
    if i == 0 and _SAVE.value:
      video_io.write_gif(_SAVE.value, video, fps=8)
    scores.append(story_metrics.score_story(video, result.segments))
  later = [s["correct"] for sc in scores for s in sc["segments"][1:]]
  first = [sc["segments"][0]["correct"] for sc in scores]
  from phenaki_jax.eval import shapes_score
  print(json.dumps({
      "generator": os.path.abspath(_GENERATOR.value), "step": gen.step,
      "stories": _STORIES.value, "segments": _SEGMENTS.value,
      "context_frames": _CONTEXT.value, "guidance_scale": _GUIDANCE.value,
      "memory_guidance_scale": _MEMORY.value, "seam_blending": _SEAM.value,
      "memory_token_frames": gen.memory_token_frames,
      "first_segment_accuracy": shapes_score.accuracy(first),
      "later_segment_accuracy": shapes_score.accuracy(later),
      "keeps_colour": float(np.mean([s["keeps_colour"] for s in scores])),
      "keeps_shape": float(np.mean([s["keeps_shape"] for s in scores])),
      "seam_ratio": float(np.nanmean([s["seam_ratio"] for s in scores])),
      "seconds": round(time.perf_counter() - start, 1),
  }, indent=2))


if __name__ == "__main__":
  app.run(main)
