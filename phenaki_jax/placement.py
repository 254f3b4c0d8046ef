"""Where inference and evaluation run: a mesh, the rules that lay weights and batches on it.

Tokenizer.load / Generator.load put the weights on a Placement (the caller's
mesh, or `inference_mesh`: all of this process's devices) by the model's
logical-axis rules; the evaluators put pretrained networks on one
(replicated) over `default_mesh`. Either way every process of a job holds
the same host copy of what it feeds in: each batch becomes one global array
split over the mesh's batch axes, built from that copy, and results come
back replicated. So every process reads the same figures on its host, and
the sums, FeatureStats and histograms it builds from them are the same
whatever the number of processes or devices, while the work is shared by all.

  placement = Placement(default_mesh(batch_size, "protocol.batch_size"))
  placement.check_batch(batch_size, "protocol.batch_size")
  fn = jax.jit(f, in_shardings=(placement.replicated, placement.batch),
               out_shardings=placement.replicated)
  host = to_host(fn(placement.put_replicated(weights), placement.put_batch(clips)))
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Iterator, Sequence

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from phenaki_jax import checkpointing, sharding
from phenaki_jax.config import mesh as config_mesh
from phenaki_jax.config.errors import ConfigError
from phenaki_jax.config.mesh import MESH_AXES

# Without a caller's rules the batch goes where the trainers' rules put it.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (("act_batch", ("data", "fsdp")),)


# --- Meshes.

def inference_mesh(config: ml_collections.ConfigDict,
                   devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The default mesh of Tokenizer.load / Generator.load.

  `devices` (this process's own by default: each process of a multi-host job
  then loads a whole copy, as a process-local caller wants) in the config's
  mesh.shape, its -1 resolved to their count; all of them data-parallel when
  that shape does not fit the count.
  """
  devices = list(jax.local_devices() if devices is None else devices)
  try:
    shape = config_mesh.resolve_mesh_shape(config.mesh.shape, len(devices))
  except ValueError:
    shape = (len(devices), 1, 1)
  return sharding.make_mesh(shape, devices)


def default_mesh(batch_size: int, key: str) -> Mesh:
  """An evaluation's (k, 1, 1) mesh: as many devices as split `batch_size`, the same per process.

  All devices of all processes when the batch divides over them. Otherwise
  the most devices per process m for which m × process_count divides it: an
  evaluation job has no mesh key, and asking for a batch that divides a
  pod's chip count would cost more padding clips than the devices save.
  Every process keeps at least one device, so each can read the replicated
  results. Raises naming `key` when the batch does not divide over the
  processes.
  """
  processes, local = jax.process_count(), jax.local_device_count()
  if batch_size <= 0 or batch_size % processes:
    raise ConfigError(f"config.{key}={batch_size}: must be a positive multiple of the "
                      f"{processes} processes (each holds part of every evaluation batch)")
  per_process = max(m for m in range(1, local + 1) if batch_size % (m * processes) == 0)
  by_process: dict[int, list[jax.Device]] = {}
  for d in sorted(jax.devices(), key=lambda d: (d.process_index, d.id)):
    by_process.setdefault(d.process_index, []).append(d)
  devices = [d for p in sorted(by_process) for d in by_process[p][:per_process]]
  if len(devices) < jax.device_count():
    logging.info("evaluation batches of %d (config.%s) split over %d of the %d devices; a "
                 "multiple of %d uses them all", batch_size, key, len(devices),
                 jax.device_count(), jax.device_count())
  return Mesh(np.asarray(devices).reshape(len(devices), 1, 1), MESH_AXES,
              axis_types=(AxisType.Auto,) * len(MESH_AXES))


def data_parallel_mesh(mesh: Mesh) -> Mesh:
  """The same devices, all on the 'data' axis."""
  return sharding.make_mesh((mesh.devices.size, 1, 1), list(mesh.devices.flat))


def batch_only_rules(rules: sharding.Rules) -> list:
  """`rules` with every logical axis but the batch's unsplit: whole weights on each device."""
  return [[name, axes if name == "act_batch" else None] for name, axes in rules]


def _ways(mesh: Mesh, axes: Any) -> int:
  if axes is None:
    return 1
  return math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))


def indivisible(abstract: Any, mesh: Mesh) -> list[str]:
  """'path shape over spec' of each abstract leaf its NamedSharding cannot split evenly."""
  bad = []
  for path, x in jax.tree_util.tree_flatten_with_path(abstract)[0]:
    spec = tuple(x.sharding.spec)
    if any(d % _ways(mesh, a) for d, a in zip(x.shape, spec)):
      bad.append(f"{jax.tree_util.keystr(path)} {tuple(x.shape)} over {spec}")
  return bad


# --- A mesh and its rules.

@dataclasses.dataclass(frozen=True)
class Placement:
  """A mesh and the logical-axis rules weights and batches follow on it."""
  mesh: Mesh
  rules: tuple[tuple[str, Any], ...] = DEFAULT_RULES

  def __post_init__(self):
    object.__setattr__(self, "rules", sharding.as_rules(self.rules))  # config lists -> tuples

  @classmethod
  def of(cls, mesh: Mesh, rules: sharding.Rules) -> "Placement":
    return cls(mesh, sharding.as_rules(rules))

  @property
  def batch(self) -> NamedSharding:
    """Batches: split over the mesh axes the 'act_batch' rule names."""
    return sharding.batch_sharding(self.mesh, self.rules)

  @property
  def replicated(self) -> NamedSharding:
    return sharding.replicated(self.mesh)

  @property
  def batch_ways(self) -> int:
    """How many ways a batch is split."""
    spec = self.batch.spec
    return _ways(self.mesh, spec[0] if len(spec) else None)

  @property
  def num_devices(self) -> int:
    return int(self.mesh.devices.size)

  def context(self) -> Iterator[None]:
    """Mesh and rules entered, as the jitted model functions need when they trace."""
    return sharding.use_mesh(self.mesh, self.rules)

  def padded_size(self, n: int) -> int:
    return -(-n // self.batch_ways) * self.batch_ways

  def check_batch(self, batch_size: int, key: str, hint: str = "") -> None:
    """Before anything compiles: a batch the mesh cannot split fails naming `key`."""
    if batch_size <= 0 or batch_size % self.batch_ways:
      raise ConfigError(
          f"config.{key}={batch_size}: must be a positive multiple of the {self.batch_ways} "
          f"ways the mesh {dict(self.mesh.shape)} splits the batch{hint}")

  def put_batch(self, x: Any) -> jax.Array:
    """A whole batch -> one global array split over the batch axes.

    A host batch must be the same on every process. One that does not
    divide by batch_ways is padded with copies of its last example; callers
    cut the results back (`[:n]`). A global array (another call's output,
    another job's batch) is resharded on device.
    """
    if isinstance(x, jax.Array) and x.shape[0] % self.batch_ways == 0:
      return put(x, self.batch)
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
      raise ValueError(f"a global batch of {x.shape[0]} does not split {self.batch_ways} "
                       f"ways over the mesh {dict(self.mesh.shape)}")
    x = np.asarray(x)
    pad = self.padded_size(x.shape[0]) - x.shape[0]
    if pad:
      x = np.concatenate([x, np.repeat(x[-1:], pad, axis=0)])
    return sharding.place(x, self.batch)

  def put_replicated(self, tree: Any) -> Any:
    return jax.tree.map(lambda x: put(x, self.replicated), tree)


def abstract_on(abstract_boxed: Any, placement: Placement) -> Any:
  """ShapeDtypeStructs of a boxed (eval_shape) tree, with their shardings by the placement."""
  return checkpointing.abstract_with_shardings(
      sharding.strip_boxes(abstract_boxed),
      sharding.tree_shardings(abstract_boxed, placement.mesh, placement.rules))


# --- Moving values onto a placement and back.

@functools.lru_cache(maxsize=64)
def _reshard_fn(target: NamedSharding):
  return jax.jit(lambda x: x, out_shardings=target)


def put(x: Any, target: NamedSharding) -> jax.Array:
  """Host values or any jax.Array -> a global array laid out as `target`.

  Host (numpy) values must be the same on every process. A global array on
  the target's devices is resharded by a jitted identity (jit does not
  reshard committed arguments itself, and a jax.device_put onto one device
  cannot take an array that spans processes); an array elsewhere goes
  through the host.
  """
  if isinstance(x, jax.Array):
    if x.sharding == target or x.sharding.is_equivalent_to(target, x.ndim):
      return x
    if x.sharding.device_set == target.device_set:
      # Under the target's mesh: jit refuses arrays on other devices than
      # the context mesh's, and a caller may be inside another mesh.
      with jax.set_mesh(target.mesh):
        return _reshard_fn(target)(x)
    x = to_host(x)
  return sharding.place(x, target)


def to_host(x: Any) -> np.ndarray:
  """A numpy copy of the whole array on this process (the same on every process)."""
  if not isinstance(x, jax.Array):
    return np.asarray(x)
  if x.is_fully_addressable or (x.is_fully_replicated and x.addressable_shards):
    return np.asarray(x)
  if isinstance(x.sharding, NamedSharding):
    return np.asarray(put(x, NamedSharding(x.sharding.mesh, PartitionSpec())))
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))
