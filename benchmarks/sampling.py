"""Speed of MaskGIT sampling: latency for one clip, throughput at a batch.

  python benchmarks/sampling.py [--config=configs/maskgit.py:VARIANT] [--steps=12,24,48]
      [--batch=8] [--runs=5] [--json]
  python benchmarks/sampling.py --config=benchmarks/bench_configs.py:gpu,maskgit \
      --tokenizer_config=benchmarks/bench_configs.py:gpu,cvivit --kinds=guided,guided+decode \
      --steps=12 --batch=0 --json        # issue 11's GPU latency figure

For each step count, with and without classifier-free guidance:
  latency     p50 / p90 seconds to sample the tokens of one clip (batch 1)
  throughput  clips/s and tokens/s at --batch
  FLOPs       analytic forward FLOPs of the generator's decode loop
              (perf.maskgit_sampling_flops; not the C-ViViT decoder's)

'guided' is the shipped sampler (phenaki_jax/generator.py `_sample_tokens`:
text encoding, then one compiled lax loop whose every step runs the
conditional and the unconditional halves as one doubled batch). 'unguided' is
the same loop (parallel_decode.decode) with the conditional model only, i.e.
what guidance costs on top. 'guided+decode' (needs --tokenizer_config) is
'guided' followed by the C-ViViT decoder turning the tokens into pixels: a
clip end to end. --kinds picks which run; --batch=0 skips the throughput
rows. One compilation serves all step counts (the count is traced, max_steps
static). Weights are random (time does not depend on them).
Not a test: figures go to benchmarks/RESULTS.md with the command, machine and date.
"""
from __future__ import annotations

import functools
import json
import os
import sys
import time

import numpy as np
from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_CONFIG = config_flags.DEFINE_config_file("config", None, "MaskGIT config (default "
                                          "configs/maskgit.py).", lock_config=False)
_TOK_CONFIG = config_flags.DEFINE_config_file(
    "tokenizer_config", None, "C-ViViT config whose decoder 'guided+decode' runs (random "
    "weights; its token grid must be the generator's).", lock_config=False)
_KINDS = flags.DEFINE_list("kinds", ["guided", "unguided"],
                           "Which to time: guided, unguided, guided+decode.")
_STEPS = flags.DEFINE_list("steps", ["12", "24", "48"], "Decoding step counts.")
_BATCH = flags.DEFINE_integer("batch", 8, "Batch for the throughput figure (0: latency only).")
_RUNS = flags.DEFINE_integer("runs", 5, "Timed runs per setting (after one warm-up).")
_SCALE = flags.DEFINE_float("guidance_scale", 3.0, "Guidance scale of the guided runs.")
_JSON = flags.DEFINE_bool("json", False, "Print one JSON line.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Parse the flags, load and check the configs, "
                             "count parameters abstractly, print one JSON line, stop.")
_PEAK = flags.DEFINE_float("peak_tflops", 0.0, "Peak TFLOP/s per device for MFU (0: the table).")


def main(_):
  import _timing  # pylint: disable=g-import-not-at-top
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from phenaki_jax.config import schema  # pylint: disable=g-import-not-at-top
  from phenaki_jax import generator, perf
  from phenaki_jax.sampling import parallel_decode  # pylint: disable=g-import-not-at-top
  from phenaki_jax.text import encoder as text_encoder  # pylint: disable=g-import-not-at-top
  from phenaki_jax import train_state  # pylint: disable=g-import-not-at-top
  from tests.helpers import load_config  # pylint: disable=g-import-not-at-top

  config = schema.complete(_CONFIG.value or load_config("maskgit"))
  model = train_state.build_maskgit(config)
  text = text_encoder.build_text_encoder(config.text)
  length = config.text.max_length
  grid = tuple(config.model.token_grid)
  n_tokens = int(np.prod(grid))
  max_steps = max(48, *(int(s) for s in _STEPS.value))

  kinds = list(_KINDS.value)
  unknown = sorted(set(kinds) - {"guided", "unguided", "guided+decode"})
  if unknown:
    raise app.UsageError(f"--kinds: unknown {unknown}; choose from guided, unguided, guided+decode")
  # Initialised under jit for the run, abstractly (eval_shape) for --dry_run.
  init = jax.eval_shape if _DRY_RUN.value else (lambda f, *a: jax.jit(f)(*a))
  params = {"generator": init(lambda r: nn.unbox(model.init(
      r, jnp.zeros((1,) + grid, jnp.int32), jnp.zeros((1, length, text.width)),
      jnp.ones((1, length), bool)))["params"], jax.random.key(0))}
  frozen_text = {}
  if text.trainable:
    params["text_encoder"] = init(lambda r: nn.unbox(text.module.init(
        r, jnp.ones((1, length), jnp.int32)))["params"], jax.random.key(1))
  else:
    frozen_text = text.pretrained
  num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params["generator"]))

  decode, tok_config = None, None
  if "guided+decode" in kinds:
    if _TOK_CONFIG.value is None:
      raise app.UsageError("--kinds=guided+decode needs --tokenizer_config")
    from phenaki_jax.text import encoder as text_encoder  # pylint: disable=g-import-not-at-top
    from phenaki_jax import train_state  # pylint: disable=g-import-not-at-top
    tok_config = schema.complete(_TOK_CONFIG.value)
    ti = tok_config.input
    tok_model = train_state.build_cvivit(tok_config)
    clip = jnp.zeros((1, ti.num_frames, ti.resolution, ti.resolution, 3))
    tok_params = init(lambda r: nn.unbox(tok_model.init(r, clip)["params"]), jax.random.key(2))
    decode = jax.jit(lambda p, c: tok_model.apply({"params": p}, c, method=tok_model.decode))
    want = jax.eval_shape(lambda p: tok_model.apply(
        {"params": p}, clip, method=tok_model.encode)[1]["codes"], tok_params).shape[1:]
    if tuple(want) != grid:
      raise app.UsageError(f"--tokenizer_config codes a {ti.num_frames}-frame "
                           f"{ti.resolution}px clip as {tuple(want)} tokens; the generator's "
                           f"token grid is {grid}")
  clip_name = (None if tok_config is None else f"{tok_config.input.num_frames}x"
               f"{tok_config.input.resolution}x{tok_config.input.resolution}")
  if _DRY_RUN.value:
    print(json.dumps(dict(_timing.header(), dry_run=True, token_grid=grid, kinds=kinds,
                          steps=[int(s) for s in _STEPS.value], batch=_BATCH.value,
                          model_dtype=config.model.dtype, params=num_params, clip=clip_name)))
    return

  guided = jax.jit(functools.partial(generator._sample_tokens, model, text),  # pylint: disable=protected-access
                   static_argnames=("max_steps", "top_k", "schedule"))

  @functools.partial(jax.jit, static_argnames=("max_steps",))
  def unguided(params, frozen_text, text_ids, text_mask, rng, start, num_steps, *, max_steps):
    context, mask = text_encoder.encode_text(text, params, frozen_text,
                                              {"text_ids": text_ids, "text_mask": text_mask})
    fn = parallel_decode.flat_logits_fn(
        lambda t: model.apply({"params": params["generator"]}, t, context, mask), grid)
    out = parallel_decode.decode(fn, rng, parallel_decode.flatten_tokens(start), num_steps,
                                 mask_id=model.mask_id, max_steps=max_steps)
    return out.tokens

  def inputs(b):
    ids, mask = text.tokenizer.encode_batch(["a large red circle moves right"] * b, length)
    start = jnp.full((b,) + grid, model.mask_id, jnp.int32)
    return jnp.asarray(ids), jnp.asarray(mask), start

  def runner(kind, b, steps):
    ids, mask, start = inputs(b)
    rng = jax.random.key(0)
    if kind in ("guided", "guided+decode"):
      keys = jax.random.key_data(jax.random.split(rng, b))  # one per example, as Generator's
      sample = lambda: guided(params, frozen_text, ids, mask, keys, start, jnp.int32(steps),
                              jnp.float32(_SCALE.value), jnp.float32(1.0), jnp.float32(4.5),
                              max_steps=max_steps, top_k=None, schedule="cosine")
      if kind == "guided":
        return sample
      return lambda: decode(tok_params, sample())
    return lambda: unguided(params, frozen_text, ids, mask, rng, start, jnp.int32(steps),
                            max_steps=max_steps)

  results = []
  peak = _PEAK.value or perf.peak_tflops()
  for kind in kinds:
    for b in (1, _BATCH.value) if _BATCH.value > 0 else (1,):
      t0 = time.perf_counter()
      jax.block_until_ready(runner(kind, b, 1)())  # compiles (once for every step count)
      compile_s = time.perf_counter() - t0
      for steps in (int(s) for s in _STEPS.value):
        times = _timing.time_callable(runner(kind, b, steps), _RUNS.value, 1)
        flops = perf.maskgit_sampling_flops(config.model, batch=b, text_len=length,
                                            text_width=text.width, steps=steps,
                                            guidance=kind != "unguided")
        p50 = float(np.percentile(times, 50))
        achieved = flops / p50 / 1e12 / jax.device_count()
        results.append({
            "guidance": kind, "batch": b, "steps": steps,
            "p50_s": p50, "p90_s": float(np.percentile(times, 90)),
            "clips_per_s": b / p50, "tokens_per_s": b * n_tokens / p50,
            "analytic_flops": flops, "achieved_tflops_per_device": achieved,
            "mfu": achieved / peak if peak else None, "first_call_s": compile_s})
  out = dict(_timing.header(), token_grid=grid, codebook_size=config.model.codebook_size,
             guidance_scale=_SCALE.value, model_dtype=config.model.dtype,
             params=num_params, clip=clip_name, results=results)
  if _JSON.value:
    print(json.dumps(out))
    return
  print(f"{out['command']}\n  device {out['device']}, {out['date']}, load average "
        f"{out['load_average']:.2f}; token grid {grid}, {config.model.codebook_size} codes")
  print(f"  {'kind':13} {'batch':>5} {'steps':>5} {'p50 s':>8} {'p90 s':>8} {'clips/s':>8} "
        f"{'tokens/s':>9} {'TFLOP/s':>8} {'MFU':>6} {'1st call s':>10}")
  for r in results:
    mfu = f"{100 * r['mfu']:.2f}%" if r["mfu"] is not None else "n/a"
    print(f"  {r['guidance']:13} {r['batch']:5d} {r['steps']:5d} {r['p50_s']:8.3f} {r['p90_s']:8.3f} "
          f"{r['clips_per_s']:8.2f} {r['tokens_per_s']:9.0f} "
          f"{r['achieved_tflops_per_device']:8.4f} {mfu:>6} {r['first_call_s']:10.2f}")


if __name__ == "__main__":
  app.run(main)
