"""What pre-tokenised input and cached text embeddings save per generator step.

  python benchmarks/generator_input.py [--variant=] [--steps=6] [--t5=t5_v1_1_small,t5_v1_1_base]

Times the jitted train step of configs/maskgit.py (default variant unless
--variant) on one batch of video clips, in these settings:

  on_the_fly/byte        frames in, the frozen C-ViViT encodes them inside the
                         step; the built-in byte encoder trains (the default)
  tokens/byte            pre-tokenised codes in (configs/pretokenize.py)
  on_the_fly/<t5>        frames in; a frozen T5 of that size encodes captions
  tokens/<t5>            codes in; the frozen T5 still runs in the step
  tokens+cache/<t5>      codes and cached embeddings in: neither frozen network runs

Weights are random (the time does not depend on them). Prints JSON with
median seconds per step and each setting's ratio to on_the_fly of the same
text encoder. Run it with nothing else heavy on the machine.
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

_VARIANT = flags.DEFINE_string("variant", "", "configs/maskgit.py variant.")
_STEPS = flags.DEFINE_integer("steps", 6, "Timed steps per setting (after 2 warm-up steps).")
_T5 = flags.DEFINE_string("t5", "t5_v1_1_small,t5_v1_1_base",
                          "Frozen T5 sizes to time (names in phenaki_jax/models/t5.py).")


def main(_):
  import jax
  import jax.numpy as jnp
  import numpy as np
  from phenaki_jax.config import schema
  from phenaki_jax import optimizers, sharding
  from phenaki_jax.models import t5
  from phenaki_jax.text import text_tokenizers
  from phenaki_jax.train import train_maskgit
  from phenaki_jax.text import encoder as text_encoder  # pylint: disable=g-import-not-at-top
  from phenaki_jax import train_state  # pylint: disable=g-import-not-at-top
  from tests.helpers import load_config  # pylint: disable=g-import-not-at-top

  config = schema.complete(load_config("maskgit", _VARIANT.value))
  tok_config = schema.complete(load_config("cvivit", _VARIANT.value))
  i = config.input
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  rng = np.random.default_rng(0)
  frames = rng.integers(0, 256, (i.batch_size, i.num_frames, i.resolution, i.resolution, 3),
                        dtype=np.uint8)
  captions = ["a large red circle moves right"] * i.batch_size

  with sharding.use_mesh(mesh, config.logical_axis_rules):
    tokenizer = train_state.build_cvivit(tok_config)
    tok_params = jax.jit(lambda r: tokenizer.init(
        r, jnp.zeros((1, i.num_frames, i.resolution, i.resolution, 3)))["params"])(
            jax.random.key(1))
    tok_params = jax.tree.map(lambda x: x.unbox() if hasattr(x, "unbox") else x, tok_params,
                              is_leaf=lambda x: hasattr(x, "unbox"))
    codes = np.asarray(jax.jit(lambda p, v: tokenizer.apply(
        {"params": p}, v, method=tokenizer.encode)[1]["codes"])(
            tok_params, jnp.asarray(frames, jnp.float32) / 127.5 - 1))
    generator = train_state.build_maskgit(config)

    def time_setting(text, frozen_text, batch):
      tx = optimizers.make_optimizer(config.optimizer, config.total_steps)
      _, shardings, init = train_state.maskgit_abstract_state(
          config, generator, text, tx, mesh)
      state = jax.jit(init, out_shardings=shardings)(jax.random.key(0))
      step = jax.jit(train_maskgit.make_train_step(generator, text, tokenizer, tx, config),
                     donate_argnums=(0,))
      frozen = {"tokenizer": tok_params, "text_encoder": frozen_text}
      times = []
      for n in range(_STEPS.value + 2):
        start = time.perf_counter()
        state, metrics, _ = step(state, batch, frozen)
        jax.block_until_ready(metrics)
        if n >= 2:
          times.append(time.perf_counter() - start)
      return statistics.median(times)

    results = {}
    byte = text_encoder.build_text_encoder(config.text)
    ids, mask = byte.tokenizer.encode_batch(captions, config.text.max_length)
    text_in = {"text_ids": ids, "text_mask": mask}
    results["on_the_fly/byte"] = time_setting(byte, {}, {"frames": frames, **text_in})
    results["tokens/byte"] = time_setting(byte, {}, {"codes": codes, **text_in})

    for name in filter(None, _T5.value.split(",")):
      sizes = t5.PRESETS[name]
      module = sizes.make_module()
      params = jax.jit(lambda r: module.init(r, jnp.ones((1, 4), jnp.int32))["params"])(
          jax.random.key(2))
      params = jax.tree.map(lambda x: x.unbox() if hasattr(x, "unbox") else x, params,
                            is_leaf=lambda x: hasattr(x, "unbox"))
      frozen_t5 = text_encoder.TextEncoder(text_tokenizers.ByteTokenizer(), module,
                                            trainable=False, pretrained=params)
      ids = np.minimum(ids, sizes.vocab_size - 1)
      t5_in = {"text_ids": ids, "text_mask": mask}
      emb = np.asarray(jax.jit(lambda p: module.apply({"params": p}, jnp.asarray(ids),
                                                      jnp.asarray(mask))[0])(params))
      cached = {"text_embeddings": emb.astype(jnp.bfloat16), "text_mask": mask}
      results[f"on_the_fly/{name}"] = time_setting(frozen_t5, params, {"frames": frames, **t5_in})
      results[f"tokens/{name}"] = time_setting(frozen_t5, params, {"codes": codes, **t5_in})
      results[f"tokens+cache/{name}"] = time_setting(frozen_t5, params, {"codes": codes, **cached})

  out = {}
  for key, seconds in results.items():
    base = results["on_the_fly/" + key.split("/", 1)[1]]
    out[key] = {"step_s": round(seconds, 4), "x_on_the_fly": round(seconds / base, 3)}
  print(json.dumps({"variant": _VARIANT.value or "default", "batch_size": i.batch_size,
                    "device": str(jax.devices()[0].device_kind), "steps": _STEPS.value,
                    "results": out}, indent=2))


if __name__ == "__main__":
  app.run(main)
