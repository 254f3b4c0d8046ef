"""What each term of the C-ViViT objective costs per train step.

  python benchmarks/tokenizer_objective.py [--variant=] [--steps=8]

Times the jitted train step of configs/cvivit.py (default variant unless
--variant) for: L2+VQ alone, + LPIPS, + I3D video perceptual, + GAN (the
discriminator's own update with R1 included), and the full objective, with the
GAN on (lazy-R1 steps weighted in); video and image batches separately, then
the mix at input.video_ratio. Prints JSON
with seconds per step and the ratio to L2+VQ, which is what "equal wall time"
comparisons need. Run it with nothing else heavy on the machine.
Not a test: figures go to benchmarks/RESULTS.md with the command, machine and date.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_VARIANT = flags.DEFINE_string("variant", "", "configs/cvivit.py variant.")
_STEPS = flags.DEFINE_integer("steps", 8, "Timed steps per setting (after 2 warm-up steps).")

TERMS = {
    "l2_vq": dict(lpips_weight=0.0, video_perceptual_weight=0.0, adversarial_weight=0.0),
    "+lpips": dict(video_perceptual_weight=0.0, adversarial_weight=0.0),
    "+video_perceptual": dict(lpips_weight=0.0, adversarial_weight=0.0),
    "+gan": dict(lpips_weight=0.0, video_perceptual_weight=0.0),
    "full": dict(),
}


def time_step(config, num_frames: int, phase: str) -> float:
  import jax
  import numpy as np
  from phenaki_jax import optimizers, sharding
  from phenaki_jax.train import train_cvivit
  from phenaki_jax.train import cvivit_objective  # pylint: disable=g-import-not-at-top
  from phenaki_jax import train_state  # pylint: disable=g-import-not-at-top
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  with sharding.use_mesh(mesh, config.logical_axis_rules):
    model = train_state.build_cvivit(config)
    tx = optimizers.make_optimizer(config.optimizer, config.total_steps)
    _, shardings, init = train_state.cvivit_abstract_state(config, model, tx, mesh)
    state = jax.jit(init, out_shardings=shardings)(jax.random.key(0))
    frozen = cvivit_objective.load_frozen_networks(config)
    step = jax.jit(train_cvivit.make_train_step(model, tx, config), donate_argnums=(0,),
                   static_argnames=("phase",))
    i = config.input
    rng = np.random.default_rng(0)
    batch = {"frames": rng.integers(0, 256, (i.batch_size, num_frames, i.resolution,
                                             i.resolution, 3), dtype=np.uint8)}
    times = []
    for n in range(_STEPS.value + 2):
      start = time.perf_counter()
      state, metrics, _ = step(state, batch, frozen, phase=phase)
      jax.block_until_ready(metrics)
      if n >= 2:
        times.append(time.perf_counter() - start)
  return statistics.median(times)


def main(_):
  from phenaki_jax.config import schema
  from phenaki_jax import train_state  # pylint: disable=g-import-not-at-top
  from tests.helpers import load_config  # pylint: disable=g-import-not-at-top
  results = {}
  for name, overrides in TERMS.items():
    config = schema.complete(load_config("cvivit", _VARIANT.value))
    config.gan.start_step = 0  # time the step with the GAN on
    for k, v in overrides.items():
      config.loss[k] = v
    def timed(num_frames):
      if not train_state.uses_gan(config):
        return time_step(config, num_frames, "off")
      # Lazy R1 runs on one step in gan.r1_every.
      k = config.gan.r1_every if config.gan.r1_weight > 0 else 1
      on = time_step(config, num_frames, "on") if k > 1 else 0.0
      r1 = time_step(config, num_frames, "r1") if config.gan.r1_weight > 0 else on
      return ((k - 1) * on + r1) / k

    video, image = timed(config.input.num_frames), timed(1)
    ratio = config.input.video_ratio
    results[name] = {"video_step_s": round(video, 4), "image_step_s": round(image, 4),
                     "mixed_step_s": round(ratio * video + (1 - ratio) * image, 4)}
    print(name, results[name], flush=True)
  base = results["l2_vq"]["mixed_step_s"]
  for r in results.values():
    r["ratio_to_l2_vq"] = round(r["mixed_step_s"] / base, 2)
  print(json.dumps({"variant": _VARIANT.value or "default", "results": results,
                    "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d")}, indent=2))


if __name__ == "__main__":
  app.run(main)
