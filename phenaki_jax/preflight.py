"""Memory pre-flight: compile a job's real train step from shapes, report memory per device.

  python -m phenaki_jax.preflight --config=configs/cvivit.py:paper --mesh=8,1,1
  python -m phenaki_jax.preflight --config=configs/maskgit.py:paper --mesh=1,4,2 \
      --hbm_gib=95 --out=/tmp/maskgit_paper.json
  python -m phenaki_jax.preflight --config=configs/cvivit.py:paper --topology=v5p:2x2x2
  python -m phenaki_jax.preflight --config=configs/sample.py:paper --topology=v5e:2x4

The sample job (configs/sample.py) has no train step: for it the tool lays
the generator's, text encoder's and tokenizer's weights out on the sampling
mesh as Generator.load does and compiles the sampler, the tokenizer's
decode and encode (sample_preflight); the verdict is weights + the largest
of those programs, against --hbm_gib or, for a TPU topology, its chips' HBM.

It builds the train step exactly as the trainer does (the trainers' own
build / optimizer / abstract-state / step functions, the same shardings and
donation) and compiles it ahead of time from jax.ShapeDtypeStructs: no
parameter is ever materialised, so a multi-billion-parameter step can be
checked on a laptop before paying for a pod. XLA's buffer assignment then
says what one device must hold: arguments (train state, batch, frozen
networks), outputs, temporaries and generated code; donated (aliased)
buffers are counted once.

Targets:
  * --topology=v5p:2x2x2 and the like: compiled by the TPU compiler for that
    slice (needs libtpu, `pip install -e ".[tpu]"`; no TPU needed). That is the
    accelerator's own buffer assignment.
  * otherwise --devices simulated CPU devices (the tool sets XLA_FLAGS before
    JAX starts) in the target mesh shape. XLA:CPU fuses, lays out and handles
    bfloat16 differently from TPU/GPU XLA, so its figures are an ESTIMATE of
    the accelerator's, not a measurement; the report says so.

From Python: `preflight(config, mesh_shape=(1, 8, 1))` returns a Report (the
process must already have enough devices; see `ensure_cpu_devices`).
"""
from __future__ import annotations

import os
import re
import sys


def _argv_value(argv: list[str], name: str) -> str | None:
  for i, arg in enumerate(argv):
    if arg.startswith(f"--{name}="):
      return arg.split("=", 1)[1]
    if arg == f"--{name}" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _cpu_device_count_from_argv(argv: list[str]) -> int | None:
  """--devices, else the product of a fully given --mesh (None: leave JAX's count)."""
  if _argv_value(argv, "topology"):
    return None
  devices = _argv_value(argv, "devices")
  if devices and devices.isdigit():
    return int(devices)
  mesh = _argv_value(argv, "mesh")
  if mesh and re.fullmatch(r"\d+,\d+,\d+", mesh.strip("()[] ")):
    n = 1
    for s in mesh.strip("()[] ").split(","):
      n *= int(s)
    return n
  return None


def set_cpu_device_flag(count: int) -> None:
  """Asks XLA:CPU for `count` devices; only effective before the JAX backend starts."""
  flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "",
                 os.environ.get("XLA_FLAGS", "")).strip()
  os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()


if __name__ == "__main__":
  # Before JAX is imported: the simulated device count is read once, when the
  # CPU backend starts.
  _n = _cpu_device_count_from_argv(sys.argv[1:])
  if _n is not None:
    set_cpu_device_flag(_n)
  if _n is not None or _argv_value(sys.argv[1:], "topology"):
    # The host's own backend stays the CPU (a TPU topology compiles without chips).
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# pylint: disable=g-import-not-at-top,wrong-import-position
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from typing import Any, Sequence  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from phenaki_jax import checkpointing, optimizers, sharding, storage, train_state  # noqa: E402
from phenaki_jax import generator as generator_lib  # noqa: E402
from phenaki_jax import tokenizer as tokenizer_lib  # noqa: E402
from phenaki_jax.config import mesh as config_mesh  # noqa: E402
from phenaki_jax.config import sampling as sampling_section  # noqa: E402
from phenaki_jax.config import schema  # noqa: E402
from phenaki_jax.config.schema import ConfigError  # noqa: E402
from phenaki_jax.models import cvivit, t5  # noqa: E402
from phenaki_jax.text import t5_weights, text_tokenizers  # noqa: E402
from phenaki_jax.text.encoder import TextEncoder, build_text_encoder  # noqa: E402
from phenaki_jax.train import cvivit_objective, train_cvivit, train_maskgit  # noqa: E402

GIB = 1024 ** 3
CPU_ESTIMATE_NOTE = (
    "compiled for simulated CPU devices: an ESTIMATE of the accelerator's memory, not a "
    "measurement (XLA:CPU fuses and lays out buffers differently, and handles bfloat16 "
    "differently, from the TPU/GPU compilers); compile with --topology on a host with "
    "libtpu for the TPU's own buffer assignment, and keep a margin either way")
DEFAULT_T5 = "t5_v1_1_xxl"  # the paper's text encoder


class PreflightError(ValueError):
  """The pre-flight could not be set up (bad flag, too few devices, no libtpu)."""


@dataclasses.dataclass
class Report:
  """What one device needs for one train step of a job."""
  config: str
  job: str
  mesh: dict[str, int]
  target: str  # 'cpu (simulated)' or the TPU topology
  estimate: bool  # True when compiled for CPU
  step: str  # which compiled variant of the step (phase, batch kind)
  global_batch: int
  per_device_batch: float
  params: dict[str, int]  # parameters per network (trained and frozen)
  state_bytes_per_device: int  # train state shards on one device, from the shardings
  memory: dict[str, int]  # from compiled.memory_analysis(), per device
  cost: dict[str, float]  # from compiled.cost_analysis(), per device
  compile_seconds: float
  notes: list[str]
  hbm_gib: float | None = None
  date: str = dataclasses.field(
      default_factory=lambda: datetime.date.today().isoformat())

  @property
  def total_bytes(self) -> int:
    return self.memory["total"]

  @property
  def fits(self) -> bool | None:
    return None if self.hbm_gib is None else self.total_bytes <= self.hbm_gib * GIB

  def to_json(self) -> dict[str, Any]:
    out = dataclasses.asdict(self)
    out["total_gib"] = self.total_bytes / GIB
    out["fits"] = self.fits
    return out

  def table(self) -> str:
    m = self.memory
    mesh = ",".join(str(v) for v in self.mesh.values())
    lines = [
        f"memory pre-flight: {self.config} (job {self.job})",
        f"  mesh (data,fsdp,tensor) = ({mesh}) on {self.target}",
        f"  step: {self.step}",
        f"  global batch {self.global_batch} ({self.per_device_batch:g} per device)",
        "  parameters: " + ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in self.params.items()),
        f"  train state per device (from its shardings): {_size(self.state_bytes_per_device)}",
        f"  compile: {self.compile_seconds:.1f} s",
        "",
        "  per device                      size",
        f"  arguments (state,batch,frozen)  {_size(m['argument'])}",
        f"  outputs                         {_size(m['output'])}",
        f"  aliased (donated, counted once) {_size(m['alias'])}",
        f"  temporaries                     {_size(m['temp'])}",
        f"  generated code                  {_size(m['generated_code'])}",
        f"  total (must fit)                {_size(m['total'])}",
    ]
    lines += ["", f"  cost per device and step: {_flops(self.cost.get('flops', float('nan')))}, "
              f"{self.cost.get('bytes_accessed', float('nan')) / GIB:.2f} GiB accessed"]
    if self.hbm_gib is not None:
      verdict = "fits" if self.fits else "DOES NOT FIT"
      lines.append(f"  {verdict} in --hbm_gib={self.hbm_gib:g} "
                   f"({self.total_bytes / GIB:.2f} GiB needed)")
    lines += [f"  note: {n}" for n in self.notes]
    return "\n".join(lines)


def _flops(n: float) -> str:
  return f"{n / 1e12:.2f} TFLOP" if n >= 1e12 else f"{n / 1e9:.3f} GFLOP"


def _size(n: int) -> str:
  if n >= GIB:
    return f"{n / GIB:10.2f} GiB"
  return f"{n / 1024 ** 2:10.2f} MiB"


# --- Devices.

def ensure_cpu_devices(count: int) -> None:
  """Makes the CPU backend start with `count` devices (call before anything uses a device)."""
  try:
    jax.config.update("jax_num_cpu_devices", count)
  except RuntimeError as e:
    raise PreflightError(f"cannot set {count} CPU devices: the JAX backend has already "
                         f"started ({e})") from None


def target_devices(num_devices: int | None, topology: str = "") -> tuple[list[Any], str]:
  """(devices to compile for, description)."""
  if topology:
    try:
      from jax.experimental import topologies
      desc = topologies.get_topology_desc(topology_name=topology, platform="tpu")
    except Exception as e:  # pylint: disable=broad-except
      raise PreflightError(
          f"--topology={topology}: cannot describe this TPU topology ({type(e).__name__}: {e}). "
          "Compiling for a TPU slice needs libtpu (pip install -e \".[tpu]\"); without it, "
          "leave --topology out to compile on simulated CPU devices") from None
    return list(desc.devices), f"TPU topology {topology} ({len(desc.devices)} chips)"
  devices = jax.devices()
  if num_devices is not None:
    if len(devices) < num_devices:
      raise PreflightError(
          f"--devices={num_devices}: this process has only {len(devices)} "
          f"{jax.default_backend()} devices; the simulated count is fixed when JAX starts "
          "(run `python -m phenaki_jax.preflight`, which sets XLA_FLAGS itself, or call "
          "ensure_cpu_devices() before anything touches a device)")
    devices = devices[:num_devices]
  kind = jax.default_backend()
  return devices, f"{kind} ({len(devices)} {'simulated ' if kind == 'cpu' else ''}devices)"


# --- Abstract inputs.

def _abstract(tree: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def _replicated_abstract(tree: Any, mesh: jax.sharding.Mesh) -> tuple[Any, Any]:
  shardings = jax.tree.map(lambda _: sharding.replicated(mesh), tree)
  return _abstract(tree, shardings), shardings


def _per_device_bytes(abstract: Any) -> int:
  total = 0
  for x in jax.tree.leaves(abstract):
    shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
    total += int(np.prod(shape)) * jnp.dtype(x.dtype).itemsize
  return total


def _count(tree: Any) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _override_mesh(config: ml_collections.ConfigDict,
                   mesh_shape: Sequence[int] | None) -> ml_collections.ConfigDict:
  config = schema.complete(config)
  if mesh_shape is not None:
    with config.unlocked():
      config.mesh.shape = tuple(int(s) for s in mesh_shape)
  return config


def _validate(config: ml_collections.ConfigDict, num_devices: int, mesh_flag: bool) -> None:
  validate = {"cvivit": schema.validate_cvivit,
              "maskgit": schema.validate_maskgit}.get(config.job)
  if validate is None:
    raise ConfigError(f"config.job={config.job!r}: the pre-flight knows the train steps of "
                      "'cvivit' and 'maskgit'")
  if config.job == "maskgit":
    # Where the frozen weights live does not change any shape: the pre-flight
    # reads none of them (see tokenizer_config_for, _text_encoder).
    config = ml_collections.ConfigDict(config.to_dict())
    config.tokenizer.workdir = config.tokenizer.workdir or "<not needed for shapes>"
    config.text.t5_path = config.text.t5_path or "<not needed for shapes>"
  try:
    validate(config, num_devices, 1)
  except ConfigError as e:
    where = (f" [mesh {tuple(config.mesh.shape)} from --mesh, {num_devices} devices]"
             if mesh_flag else f" [{num_devices} devices]")
    raise ConfigError(f"{e}{where}") from None


# --- The two train steps.

def _tokenizer_step(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
  """(jitted step, abstract args, static args, description, params, abstract state)."""
  rules = config.logical_axis_rules
  batch_sharding = sharding.batch_sharding(mesh, rules)
  replicated = sharding.replicated(mesh)
  model = train_state.build_cvivit(config)
  tx = optimizers.make_optimizer(config.optimizer, config.total_steps)
  abstract_state, state_shardings, _ = train_state.cvivit_abstract_state(config, model, tx, mesh)
  # The pretrained LPIPS / I3D weights ship in their pip packages: read on the
  # host for their shapes only, never put on a device.
  frozen, _ = _replicated_abstract(
      jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype),
                   cvivit_objective.load_frozen_networks(config)), mesh)
  i = config.input
  batch = {"frames": jax.ShapeDtypeStruct(
      (i.batch_size, i.num_frames, i.resolution, i.resolution, 3), jnp.uint8,
      sharding=batch_sharding)}
  # The largest of the statically compiled variants: R1 (a double backward
  # through the discriminator) with the perceptual networks on, on a video batch.
  phase = "off"
  if train_state.uses_gan(config):
    phase = "r1" if config.gan.r1_weight > 0 else "on"
  perceptual = config.loss.lpips_weight > 0 or config.loss.video_perceptual_weight > 0
  step = jax.jit(train_cvivit.make_train_step(model, tx, config),
                 in_shardings=(state_shardings, batch_sharding, replicated),
                 out_shardings=(state_shardings, replicated, replicated), donate_argnums=(0,),
                 static_argnums=(3, 4))
  description = (f"tokenizer update, GAN phase '{phase}' with perceptual "
                 f"{'on' if perceptual else 'off'} on a video batch (the largest compiled "
                 "variant; the trainer also compiles 'off'/'on' phases and image batches)")
  params = {"cvivit": _count(abstract_state.params)}
  if abstract_state.disc_params:
    params["discriminator"] = _count(abstract_state.disc_params)
  state = _abstract(abstract_state, state_shardings)
  return step, (state, batch, frozen, phase, perceptual), description, params, state


def _load_config_file(path_and_variant: str) -> ml_collections.ConfigDict:
  path, _, variant = path_and_variant.partition(":")
  spec = importlib.util.spec_from_file_location("preflight_tokenizer_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)


def tokenizer_config_for(config: ml_collections.ConfigDict, config_arg: str = ""
                         ) -> tuple[ml_collections.ConfigDict, str]:
  """The frozen tokenizer's config for a generator config, and where it came from.

  The saved config of config.tokenizer.workdir's checkpoint when there is
  one; else configs/cvivit.py with the generator config's variant (tiny ->
  tiny, paper -> paper), next to the generator's config file.
  """
  tok_dir = config.tokenizer.workdir
  steps = checkpointing.finalized_steps(tok_dir) if tok_dir else []
  if steps:
    step = config.tokenizer.step if config.tokenizer.step in steps else steps[-1]
    ckpt = checkpointing.Checkpointer(storage.join(tok_dir, "checkpoints"), max_to_keep=1000,
                                      async_save=False)
    try:
      saved = ml_collections.ConfigDict(ckpt.restore_config(step))
    finally:
      ckpt.close()
    return schema.complete(saved), f"{tok_dir} step {step}"
  path, _, variant = config_arg.partition(":")
  # A config file is Python, imported from a local folder (never a bucket).
  folder = storage.dirname(path) if path else "configs"
  source = storage.join(folder, "cvivit.py") + (f":{variant}" if variant else "")
  return schema.complete(_load_config_file(source)), source


def _text_encoder(config: ml_collections.ConfigDict, t5_preset: str):
  """The text encoder's module without its weights; and a note on its size."""
  if config.text.encoder == "byte":
    return build_text_encoder(config.text), None
  path = config.text.t5_path
  hf_config = storage.join(path, "config.json") if path and storage.isdir(path) else ""
  if hf_config and storage.exists(hf_config):
    sizes, where = t5_weights.config_from_hf(hf_config), hf_config
  else:
    try:
      sizes, where = t5.get_config(t5_preset), f"--t5={t5_preset}"
    except ValueError as e:
      raise PreflightError(f"--t5={t5_preset}: {e}") from None
  module = sizes.make_module(dtype=jnp.dtype(config.text.dtype))
  text = TextEncoder(text_tokenizers.ByteTokenizer(), module, trainable=not config.text.frozen)
  note = (f"T5 encoder sizes from {where} (d_model {sizes.d_model}, {sizes.num_layers} layers)"
          f", {'frozen' if config.text.frozen else 'trained'}")
  return text, note


def _generator_step(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                    config_arg: str, tokenizer_config: ml_collections.ConfigDict | None,
                    t5_preset: str):
  notes = []
  if tokenizer_config is None:
    tok_config, source = tokenizer_config_for(config, config_arg)
  else:
    tok_config, source = schema.complete(tokenizer_config), "the given tokenizer config"
  notes.append(f"frozen tokenizer shapes from {source}")
  tokenizer_lib.check_tokenizer_match(config, tok_config, source)
  text, text_note = _text_encoder(config, t5_preset)
  if text_note:
    notes.append(text_note)
  rules = config.logical_axis_rules
  batch_sharding = sharding.batch_sharding(mesh, rules)
  replicated = sharding.replicated(mesh)
  generator = train_state.build_maskgit(config)
  tx = optimizers.make_optimizer(config.optimizer, config.total_steps)
  abstract_state, state_shardings, _ = train_state.maskgit_abstract_state(
      config, generator, text, tx, mesh)
  tok_model = train_state.build_cvivit(tok_config)
  ti = tok_config.input
  tok_params = sharding.strip_boxes(jax.eval_shape(
      tok_model.init, jax.random.key(0),
      jnp.zeros((1, ti.num_frames, ti.resolution, ti.resolution, 3), jnp.float32))["params"])
  text_shapes, frozen_shardings = train_maskgit.frozen_input_specs(tok_params, text, config, mesh)
  frozen = _abstract({"tokenizer": tok_params, "text_encoder": text_shapes}, frozen_shardings)
  i, length = config.input, config.text.max_length
  b = i.batch_size
  spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding)
  if i.data == "tokens":
    # Pre-tokenised shards: codes, and cached bfloat16 embeddings of a frozen T5.
    batch = {"codes": spec((b,) + tuple(config.model.token_grid), jnp.int32),
             "text_mask": spec((b, length), jnp.bool_)}
    if config.text.encoder == "t5" and config.text.frozen:
      batch["text_embeddings"] = spec((b, length, text.width), jnp.bfloat16)
    else:
      batch["text_ids"] = spec((b, length), jnp.int32)
    kind = "a pre-tokenised video batch"
  else:
    batch = {"frames": spec((b, i.num_frames, i.resolution, i.resolution, 3), jnp.uint8),
             "text_ids": spec((b, length), jnp.int32),
             "text_mask": spec((b, length), jnp.bool_)}
    kind = "a video batch encoded by the frozen tokenizer inside the step"
  step = jax.jit(train_maskgit.make_train_step(generator, text, tok_model, tx, config),
                 in_shardings=(state_shardings, batch_sharding, frozen_shardings),
                 out_shardings=(state_shardings, replicated, replicated), donate_argnums=(0,))
  params = {name: _count(tree) for name, tree in abstract_state.params.items()}
  params["frozen tokenizer"] = _count(tok_params)
  if text_shapes:
    params["frozen text encoder"] = _count(text_shapes)
  state = _abstract(abstract_state, state_shardings)
  description = f"generator update on {kind}"
  return step, (state, batch, frozen), description, params, state, notes


# --- The pre-flight.

@contextlib.contextmanager
def _abstract_mesh_context(mesh: jax.sharding.Mesh, rules: Any):
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), \
      nn.logical_axis_rules(sharding.as_rules(rules)):
    yield


def _memory(compiled: Any) -> dict[str, int]:
  stats = compiled.memory_analysis()
  if stats is None:
    raise PreflightError("this backend's compiler gives no memory analysis")
  m = {"argument": int(stats.argument_size_in_bytes),
       "output": int(stats.output_size_in_bytes),
       "alias": int(stats.alias_size_in_bytes),
       "temp": int(stats.temp_size_in_bytes),
       "generated_code": int(stats.generated_code_size_in_bytes)}
  # Donated state is both an argument and an output: its buffers count once.
  m["total"] = m["argument"] + m["output"] - m["alias"] + m["temp"] + m["generated_code"]
  # XLA's own peak figure, kept in the JSON only: XLA:CPU's leaves out
  # temporaries (it is below arguments + temporaries there).
  peak = getattr(stats, "peak_memory_in_bytes", 0)
  if peak:
    m["peak"] = int(peak)
  return m


def _cost(compiled: Any) -> dict[str, float]:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older JAX: one dict per program
    cost = cost[0] if cost else {}
  cost = cost or {}
  return {"flops": float(cost.get("flops", float("nan"))),
          "bytes_accessed": float(cost.get("bytes accessed", float("nan")))}


def preflight(config: ml_collections.ConfigDict, *, mesh_shape: Sequence[int] | None = None,
              num_devices: int | None = None, topology: str = "", hbm_gib: float | None = None,
              config_name: str = "", tokenizer_config: ml_collections.ConfigDict | None = None,
              t5_preset: str = DEFAULT_T5) -> Report | SampleReport:
  """Compiles the job's train step for the target from shapes only; returns the memory report.

  A configs/sample.py config goes to sample_preflight (its programs, not a
  train step; a SampleReport).

  Args:
    config: a configs/cvivit.py, configs/maskgit.py or configs/sample.py config.
    mesh_shape: (data, fsdp, tensor), replacing config.mesh.shape.
    num_devices: devices to compile for; default the product of the mesh
      shape (or all of this process's devices when the mesh has a -1).
    topology: a TPU topology name such as 'v5p:2x2x2' (needs libtpu).
    hbm_gib: memory per device the job must fit in (only recorded here; the
      CLI fails when it does not fit).
    config_name: how to name the config in messages ('configs/cvivit.py:paper').
    tokenizer_config: the generator's frozen tokenizer config; default see
      tokenizer_config_for.
    t5_preset: T5 sizes (t5.PRESETS) when the generator uses a pretrained T5
      whose config.json is not at config.text.t5_path.
  """
  if config.get("job") == "sample":
    return sample_preflight(config, mesh_shape=mesh_shape, num_devices=num_devices,
                            topology=topology, hbm_gib=hbm_gib, config_name=config_name,
                            tokenizer_config=tokenizer_config, t5_preset=t5_preset)
  config = _override_mesh(config, mesh_shape)
  name = config_name or f"config.job={config.job!r}"
  mesh_given = tuple(config.mesh.shape)
  if num_devices is None and not topology and -1 not in mesh_given:
    num_devices = int(np.prod(mesh_given))
  # Config and mesh first: a bad value fails here, before anything compiles.
  if topology:
    devices, target = target_devices(None, topology)
  else:
    devices, target = target_devices(num_devices, "")
  _validate(config, len(devices), mesh_shape is not None)
  mesh = sharding.make_mesh(config.mesh.shape, devices)
  notes = []
  # Shapes and shardings as the trainer makes them under its mesh. A TPU
  # topology's devices cannot run the small eager ops of that set-up (rng
  # keys, dummy inputs), so there it happens under the mesh's abstract twin;
  # the step itself is lowered under the real target mesh either way.
  rules = config.logical_axis_rules
  setup = (_abstract_mesh_context(mesh, rules) if topology
           else sharding.use_mesh(mesh, rules))
  with setup:
    if config.job == "cvivit":
      step, args, description, params, state = _tokenizer_step(config, mesh)
    else:
      step, args, description, params, state, notes = _generator_step(
          config, mesh, config_name, tokenizer_config, t5_preset)
  with sharding.use_mesh(mesh, config.logical_axis_rules):
    start = time.monotonic()
    compiled = step.lower(*args).compile()
    seconds = time.monotonic() - start
  estimate = not topology and jax.default_backend() == "cpu"
  if estimate:
    notes.append(CPU_ESTIMATE_NOTE)
  batch_ways = config_mesh.batch_ways(config, tuple(mesh.shape.values()))
  return Report(
      config=name, job=config.job, mesh=dict(mesh.shape), target=target, estimate=estimate,
      step=description, global_batch=int(config.input.batch_size),
      per_device_batch=config.input.batch_size / batch_ways, params=params,
      state_bytes_per_device=_per_device_bytes(state), memory=_memory(compiled),
      cost=_cost(compiled), compile_seconds=seconds, notes=notes, hbm_gib=hbm_gib)


def too_big_message(report: Report) -> str:
  mesh = ",".join(str(v) for v in report.mesh.values())
  return (f"error: {report.config} on mesh (data,fsdp,tensor)=({mesh}) needs "
          f"{report.total_bytes / GIB:.2f} GiB per device (total of arguments "
          f"{report.memory['argument'] / GIB:.2f} + outputs {report.memory['output'] / GIB:.2f} "
          f"- aliased {report.memory['alias'] / GIB:.2f} + temporaries "
          f"{report.memory['temp'] / GIB:.2f} + code "
          f"{report.memory['generated_code'] / GIB:.2f} GiB), more than --hbm_gib="
          f"{report.hbm_gib:g}" + (" (a CPU-compiled estimate)" if report.estimate else ""))


# --- The sampling job (configs/sample.py): what one device holds while it samples.

# HBM per chip of the TPUs the launch scripts know, by device_kind: a
# topology's verdict without --hbm_gib.
TPU_HBM_GIB = {"TPU v4": 32.0, "TPU v5 lite": 16.0, "TPU v5": 95.0, "TPU v5p": 95.0,
               "TPU v6 lite": 32.0}


@dataclasses.dataclass
class SampleReport:
  """What one device holds while the sample job runs: weights, and the largest program."""
  config: str
  generator: str  # where the generator's config came from
  tokenizer: str
  mesh: dict[str, int]
  target: str
  estimate: bool
  batch: int  # prompts per sampling call
  batch_ways: int
  params: dict[str, int]  # parameters per network
  # Weights resident on one device the whole job, per network (from their shardings).
  weights_bytes_per_device: dict[str, int]
  weights_layout: dict[str, str]  # 'by its rules' / 'replicated' per network
  # Per compiled program ('sampling', 'decode', 'encode'): memory_analysis()
  # per device, plus 'beyond_weights' = all it needs besides the resident weights.
  programs: dict[str, dict[str, int]]
  compile_seconds: float
  notes: list[str]
  hbm_gib: float | None = None
  job: str = "sample"
  date: str = dataclasses.field(default_factory=lambda: datetime.date.today().isoformat())

  @property
  def weights_bytes(self) -> int:
    return sum(self.weights_bytes_per_device.values())

  @property
  def largest_program(self) -> str:
    return max(self.programs, key=lambda k: self.programs[k]["beyond_weights"])

  @property
  def total_bytes(self) -> int:
    """Every weight stays resident; one program runs at a time."""
    return self.weights_bytes + self.programs[self.largest_program]["beyond_weights"]

  @property
  def fits(self) -> bool | None:
    return None if self.hbm_gib is None else self.total_bytes <= self.hbm_gib * GIB

  def to_json(self) -> dict[str, Any]:
    out = dataclasses.asdict(self)
    out.update(total_bytes=self.total_bytes, total_gib=self.total_bytes / GIB, fits=self.fits)
    return out

  def table(self) -> str:
    mesh = ",".join(str(v) for v in self.mesh.values())
    lines = [
        f"sampling pre-flight: {self.config} (job sample)",
        f"  generator from {self.generator}; tokenizer from {self.tokenizer}",
        f"  mesh (data,fsdp,tensor) = ({mesh}) on {self.target}",
        f"  batch {self.batch} prompts, split {self.batch_ways} ways "
        f"({self.batch / self.batch_ways:g} per device; the sampler runs 2 passes each, CFG)",
        "  parameters: " + ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in self.params.items()),
        f"  compile: {self.compile_seconds:.1f} s",
        "",
        "  per device                                       size",
    ]
    for name, n in self.weights_bytes_per_device.items():
      lines.append(f"  {name + ' weights (' + self.weights_layout[name] + ')':<46} {_size(n)}")
    for name, m in self.programs.items():
      lines.append(f"  {name + ': inputs, outputs, temporaries':<46} {_size(m['beyond_weights'])}"
                   f"   (temporaries {_size(m['temp']).strip()})")
    lines.append(f"  {'total (weights + ' + self.largest_program + ', must fit)':<46} "
                 f"{_size(self.total_bytes)}")
    if self.hbm_gib is not None:
      verdict = "fits" if self.fits else "DOES NOT FIT"
      lines.append(f"  {verdict} in {self.hbm_gib:g} GiB per device "
                   f"({self.total_bytes / GIB:.2f} GiB needed)")
    lines += [f"  note: {n}" for n in self.notes]
    return "\n".join(lines)

  def too_big_message(self) -> str:
    mesh = ",".join(str(v) for v in self.mesh.values())
    return (f"error: {self.config} on mesh (data,fsdp,tensor)=({mesh}) needs "
            f"{self.total_bytes / GIB:.2f} GiB per device (weights "
            f"{self.weights_bytes / GIB:.2f} + {self.largest_program} "
            f"{self.programs[self.largest_program]['beyond_weights'] / GIB:.2f} GiB), more "
            f"than {self.hbm_gib:g} GiB" + (" (a CPU-compiled estimate)" if self.estimate else ""))


def generator_config_for(config: ml_collections.ConfigDict, config_arg: str = ""
                         ) -> tuple[ml_collections.ConfigDict, str, str]:
  """(the generator's config for a sample config, where it came from, the config
  file argument its tokenizer's shapes are looked up by: '' for a saved one).

  The saved config of config.generator.workdir's checkpoint when there is
  one; else configs/maskgit.py with the sample config's variant (tiny ->
  tiny, paper -> paper; one maskgit.py lacks -> its default), next to the
  sample config's file.
  """
  g = config.generator
  steps = checkpointing.finalized_steps(g.workdir) if g.workdir else []
  if steps:
    step = g.step if g.step in steps else steps[-1]
    return (generator_lib.Generator.read_config(g.workdir, step), f"{g.workdir} step {step}",
            "")
  path, _, variant = config_arg.partition(":")
  folder = storage.dirname(path) if path else "configs"
  source = storage.join(folder, "maskgit.py") + (f":{variant}" if variant else "")
  try:
    loaded = _load_config_file(source)
  except ConfigError:
    source = storage.join(folder, "maskgit.py")
    loaded = _load_config_file(source)
  return schema.complete(loaded), source, source


def _program_memory(compiled: Any, inputs: Any) -> dict[str, int]:
  """memory_analysis() per device, and 'beyond_weights': the program's own inputs
  (not the weights, resident anyway: jit passes it only those it reads),
  outputs, temporaries and code."""
  m = _memory(compiled)
  m["inputs"] = _per_device_bytes(inputs)
  m["beyond_weights"] = (m["inputs"] + m["output"] - m["alias"] + m["temp"]
                         + m["generated_code"])
  return m


def sample_preflight(config: ml_collections.ConfigDict, *,
                     mesh_shape: Sequence[int] | None = None, num_devices: int | None = None,
                     topology: str = "", hbm_gib: float | None = None, config_name: str = "",
                     tokenizer_config: ml_collections.ConfigDict | None = None,
                     t5_preset: str = DEFAULT_T5,
                     generator_config: ml_collections.ConfigDict | None = None
                     ) -> SampleReport:
  """Compiles the sample job's programs from shapes for the target; what one device holds.

  The generator's weights (EMA or raw: the same shapes), its frozen text
  encoder's and the tokenizer's, laid out on the sampling mesh exactly as
  Generator.load lays them (generator.generator_placement,
  frozen_text_shardings, tokenizer.tokenizer_placement); then the jitted
  sampler (the whole decoding loop with CFG: its temporaries are one step's
  activations), the tokenizer's decode of one batch of tokens and its
  encode of one batch of clips (a story's context, the tokenizer ceiling),
  each compiled ahead of time. Nothing is loaded.
  """
  config = _override_mesh(config, mesh_shape)
  name = config_name or "configs/sample.py"
  if generator_config is None:
    gen_config, gen_source, gen_arg = generator_config_for(config, config_name)
  else:
    gen_config, gen_source, gen_arg = (schema.complete(generator_config),
                                       "the given generator config", "")
  if tokenizer_config is None:
    tok_config, tok_source = tokenizer_config_for(gen_config, gen_arg)
  else:
    tok_config, tok_source = schema.complete(tokenizer_config), "the given tokenizer config"
  tokenizer_lib.check_tokenizer_match(gen_config, tok_config, tok_source)
  given = tuple(config.mesh.shape)
  if num_devices is None and not topology and -1 not in given:
    num_devices = int(np.prod(given))
  devices, target = target_devices(None, topology) if topology else target_devices(
      num_devices, "")
  try:
    shape = sampling_section.check_mesh(config, gen_config, len(devices))
  except ConfigError as e:
    where = f" [--mesh, {len(devices)} devices]" if mesh_shape is not None else (
        f" [{len(devices)} devices]")
    raise ConfigError(f"{e}{where}") from None
  mesh = sharding.make_mesh(shape, devices)
  if hbm_gib is None and topology:
    hbm_gib = TPU_HBM_GIB.get(devices[0].device_kind)
  options = generator_lib.SamplingOptions.from_config(config.sampling)

  notes = [f"weights: the generator's {'EMA' if config.generator.use_ema else 'raw'} "
           "parameters only (no optimizer state), all three networks resident while one "
           "program runs at a time"]
  text, text_note = _text_encoder(gen_config, t5_preset)
  if text_note:
    notes.append(text_note)
  model = train_state.build_maskgit(gen_config)
  try:
    placement, gen_params = generator_lib.generator_placement(gen_config, model, text, mesh)
  except ValueError as e:
    raise ConfigError(f"config.mesh.shape={tuple(config.mesh.shape)}: {e}") from None
  frozen_text = {}
  if not text.trainable:
    boxed = jax.eval_shape(text.module.init, jax.random.key(0),
                           jnp.ones((1, gen_config.text.max_length), jnp.int32))["params"]
    frozen_text = _abstract(sharding.strip_boxes(boxed), generator_lib.frozen_text_shardings(
        gen_config, text, placement))
  tok_model = train_state.build_cvivit(tok_config)
  tok_placement, tok_params = tokenizer_lib.tokenizer_placement(
      tok_config, tokenizer_lib.cvivit_abstract_boxed(tok_config, tok_model), mesh)

  gen_own = {k: v for k, v in gen_params.items() if k == "generator"}
  weights = {"generator": _per_device_bytes(gen_own)}
  layout = {"generator": "by its rules"}
  params = {"generator": _count(gen_own)}
  text_tree = gen_params.get("text_encoder") or frozen_text
  if text_tree:
    weights["text encoder"] = _per_device_bytes(text_tree)
    params["text encoder"] = _count(text_tree)
    split = any(x.sharding.spec != jax.sharding.PartitionSpec()
                for x in jax.tree.leaves(text_tree))
    layout["text encoder"] = ("trained, " if text.trainable else "frozen, ") + (
        "by the rules" if split else "replicated")
  weights["tokenizer"] = _per_device_bytes(tok_params)
  params["tokenizer"] = _count(tok_params)
  layout["tokenizer"] = ("by its rules" if tuple(tok_placement.rules) == tuple(
      sharding.as_rules(tok_config.logical_axis_rules)) else "replicated, batch split")

  b = config.batch_size
  t, h, w = tuple(gen_config.model.token_grid)
  length = gen_config.text.max_length
  batch = lambda p, shape_, dtype: jax.ShapeDtypeStruct(shape_, dtype,
                                                        sharding=p.batch)
  rep = lambda shape_, dtype: jax.ShapeDtypeStruct(shape_, dtype, sharding=placement.replicated)
  key = jax.random.key_data(jax.random.key(0))
  sampler = jax.jit(generator_lib.sample_fn(model, text),
                    static_argnames=generator_lib.SAMPLE_STATIC,
                    out_shardings=placement.replicated)
  sample_args = (gen_params, frozen_text, batch(placement, (b, length), jnp.int32),
                 batch(placement, (b, length), jnp.bool_),
                 batch(placement, (b,) + key.shape, key.dtype),  # a key per example
                 batch(placement, (b, t, h, w), jnp.int32), rep((), jnp.int32),
                 rep((), jnp.float32), rep((), jnp.float32), rep((), jnp.float32), None, None)
  sample_kw = dict(max_steps=options.max_steps, top_k=options.top_k or None,
                   schedule=gen_config.mask_schedule,
                   guidance_schedule=options.guidance_schedule)
  ti = tok_config.input
  frames = cvivit.num_frames_of(t, int(tok_config.model.temporal_patch_size))
  tok_rep = tok_placement.replicated
  programs, seconds = {}, 0.0
  for prog, fn, args, kw, where in (
      ("sampling", sampler, sample_args, sample_kw, placement),
      ("decode", jax.jit(tokenizer_lib.decode_fn(tok_model), out_shardings=tok_rep),
       (tok_params, batch(tok_placement, (b, t, h, w), jnp.int32)), {}, tok_placement),
      ("encode", jax.jit(tokenizer_lib.encode_fn(tok_model), out_shardings=tok_rep),
       (tok_params, batch(tok_placement, (b, frames, ti.resolution, ti.resolution, 3),
                          jnp.uint8)), {}, tok_placement)):
    with where.context():
      begin = time.monotonic()
      compiled = fn.lower(*args, **kw).compile()
      seconds += time.monotonic() - begin
    # Arguments past the weights (sampler: params, frozen text; tokenizer: params).
    programs[prog] = _program_memory(compiled, args[2 if prog == "sampling" else 1:])
  estimate = not topology and jax.default_backend() == "cpu"
  if estimate:
    notes.append(CPU_ESTIMATE_NOTE)
  return SampleReport(
      config=name, generator=gen_source, tokenizer=tok_source, mesh=dict(mesh.shape),
      target=target, estimate=estimate, batch=b, batch_ways=placement.batch_ways,
      params=params, weights_bytes_per_device=weights, weights_layout=layout,
      programs=programs, compile_seconds=seconds, notes=notes, hbm_gib=hbm_gib)


# --- Command line.

def parse_mesh(text: str) -> tuple[int, int, int]:
  parts = text.strip("()[] ").split(",")
  try:
    shape = tuple(int(p) for p in parts)
  except ValueError:
    shape = ()
  if len(shape) != 3:
    raise PreflightError(f"--mesh={text}: expected three comma-separated sizes "
                         "data,fsdp,tensor (e.g. --mesh=1,8,1)")
  return shape


def main(argv: Sequence[str]) -> int:
  from absl import flags
  del argv
  f = flags.FLAGS
  try:
    mesh = parse_mesh(f.mesh) if f.mesh else None
    config_arg = _argv_value(sys.argv[1:], "config") or ""
    report = preflight(f.config, mesh_shape=mesh, num_devices=f.devices, topology=f.topology,
                       hbm_gib=f.hbm_gib, config_name=config_arg,
                       tokenizer_config=f.tokenizer_config, t5_preset=f.t5)
  except (ConfigError, PreflightError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(report.table())
  if f.out:
    storage.write_text(f.out, json.dumps(report.to_json(), indent=2) + "\n")
    print(f"  written: {f.out}")
  if report.fits is False:
    print(too_big_message(report) if isinstance(report, Report) else report.too_big_message(),
          file=sys.stderr)
    return 1
  return 0


def _define_flags() -> None:
  from absl import flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", None, "Job config file (and :variant).",
                                  lock_config=True)
  config_flags.DEFINE_config_file(
      "tokenizer_config", None, "Generator jobs: the frozen tokenizer's config; default the "
      "saved config of config.tokenizer.workdir, else configs/cvivit.py with the same variant.",
      lock_config=True)
  flags.DEFINE_string("mesh", "", "data,fsdp,tensor sizes replacing config.mesh.shape.")
  flags.DEFINE_integer("devices", None, "Simulated CPU devices to compile for (default: the "
                       "product of --mesh).")
  flags.DEFINE_string("topology", "", "A TPU topology such as v5p:2x2x2 (needs libtpu).")
  flags.DEFINE_float("hbm_gib", None, "Memory per device; exit 1 when the step needs more.")
  flags.DEFINE_string("out", "", "Write the report as JSON here.")
  flags.DEFINE_string("t5", DEFAULT_T5, f"T5 sizes for a t5 text encoder without a "
                      f"config.json at text.t5_path: one of {sorted(t5.PRESETS)}.")
  flags.mark_flags_as_required(["config"])


if __name__ == "__main__":
  from absl import app
  _define_flags()
  app.run(lambda argv: sys.exit(main(argv)))
