"""Where evaluation runs: one mesh over the devices of every process, the batch split over it.

Every process of a job holds the same host copy of what it evaluates (the
same seed, files and prompts give the same clips). Each batch becomes one
global array split over the mesh's batch axis, built from that host copy;
pretrained weights are replicated on the mesh; results come back replicated.
So every process reads the same figures on its host, and the sums,
FeatureStats and histograms it builds from them are the same whatever the
number of processes or devices, while the work is shared by all of them.

  placement = Placement(default_mesh(batch_size, "protocol.batch_size"))
  placement.check_batch(batch_size, "protocol.batch_size")
  fn = jax.jit(f, in_shardings=(placement.replicated, placement.batch),
               out_shardings=placement.replicated)
  host = to_host(fn(placement.put_replicated(weights), placement.put_batch(clips)))
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from phenaki_jax import sharding
from phenaki_jax.config.errors import ConfigError
from phenaki_jax.config.mesh import MESH_AXES

# Without a caller's rules the batch goes where the trainers' rules put it.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (("act_batch", ("data", "fsdp")),)


def default_mesh(batch_size: int, key: str) -> Mesh:
  """A (k, 1, 1) mesh with as many devices as split `batch_size`, the same count per process.

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


@dataclasses.dataclass(frozen=True)
class Placement:
  """A mesh and the logical rules that say which of its axes the batch goes over."""
  mesh: Mesh
  rules: Sequence[tuple[str, Any]] = DEFAULT_RULES

  @property
  def batch(self) -> NamedSharding:
    return sharding.batch_sharding(self.mesh, self.rules)

  @property
  def replicated(self) -> NamedSharding:
    return sharding.replicated(self.mesh)

  @property
  def batch_ways(self) -> int:
    spec = self.batch.spec
    axes = spec[0] if len(spec) else None
    axes = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
    return int(np.prod([self.mesh.shape[a] for a in axes], dtype=np.int64))

  @property
  def num_devices(self) -> int:
    return int(self.mesh.devices.size)

  def check_batch(self, batch_size: int, key: str, hint: str = "") -> None:
    """Before anything compiles: a batch the mesh cannot split fails naming `key`."""
    if batch_size <= 0 or batch_size % self.batch_ways:
      raise ConfigError(
          f"config.{key}={batch_size}: must be a positive multiple of the {self.batch_ways} "
          f"ways the evaluation mesh {dict(self.mesh.shape)} splits the batch{hint}")

  def put_batch(self, x: Any) -> jax.Array:
    return put(x, self.batch)

  def put_replicated(self, tree: Any) -> Any:
    return jax.tree.map(lambda x: put(x, self.replicated), tree)


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
