"""The mesh section: `mesh.shape` and `logical_axis_rules`, and what must divide over them.

A trainer's weights are created sharded and its batch is split over the mesh,
so sizes that do not divide evenly fail here, naming the key, before anything
compiles.

The batch and the processes. Each process reads `batch_size / processes`
examples of its own and hands them to `jax.make_array_from_process_local_data`
(sharding.host_to_global), which places them on the batch shards its devices
hold. That is only the global batch the step thinks it is when every batch
shard (a slice of 'act_batch' over data × fsdp) lies on the devices of ONE
process: a shard held by devices of two processes gets different examples
from each, and JAX neither notices nor complains (it infers a smaller global
batch and trusts the hosts to agree). So the check here is exactly: no batch
shard spans processes. With devices in process order (as jax.make_mesh lays
out CPU and GPU devices, sharding.make_mesh) this needs the batch ways to be
a multiple of the processes and 'act_batch' on the mesh's leading axes.
`check` tests it for a simulated layout (num_devices, process_count) before
anything starts; `check_process_layout` tests a real mesh. A TPU mesh
follows the chips' torus, not the process order, and there the simulation is
not enough: jax 0.10's mesh_utils.create_device_mesh over stand-in devices
with the coordinates of a 4x4x4 v4 slice (16 hosts of 2x2x1 chips) puts the
tensor axis of (16, 1, 4) across hosts, so every batch shard spans 2
processes, while (64, 1, 1) gives each host whole shards, but interleaved
(host 0 holds shards 0, 4, 16, 20), not a block.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import ml_collections
import numpy as np

from phenaki_jax.config import errors
from phenaki_jax.config import rules as rules_lib

MESH_AXES = ("data", "fsdp", "tensor")


def defaults(rules: Iterable[tuple[str, Any]]) -> ml_collections.ConfigDict:
  """The top-level `mesh` and `logical_axis_rules` keys of a trainer."""
  c = ml_collections.ConfigDict()
  c.mesh = ml_collections.ConfigDict()
  c.mesh.shape = (-1, 1, 1)  # (data, fsdp, tensor); one -1 takes the remaining devices.
  c.logical_axis_rules = rules_lib.as_lists(rules)
  return c


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
  """Fills one -1 entry so that the product equals `num_devices`."""
  shape = tuple(int(s) for s in shape)
  if len(shape) != len(MESH_AXES):
    raise ValueError(f"config.mesh.shape={shape}: needs one size per axis {MESH_AXES}")
  if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
    raise ValueError(f"config.mesh.shape={shape}: sizes must be positive, with at most one -1")
  known = 1
  for s in shape:
    if s != -1:
      known *= s
  if num_devices % known:
    raise ValueError(f"config.mesh.shape={shape}: {known} does not divide the {num_devices} devices")
  if -1 in shape:
    shape = tuple(num_devices // known if s == -1 else s for s in shape)
  total = 1
  for s in shape:
    total *= s
  if total != num_devices:
    raise ValueError(f"config.mesh.shape={shape} has {total} devices; there are {num_devices}")
  return shape


def mesh_ways(config: ml_collections.ConfigDict, mesh_shape: tuple[int, ...],
              logical_name: str) -> int:
  """How many ways the rules split a logical axis on this mesh."""
  sizes = dict(zip(MESH_AXES, mesh_shape))
  for name, axes in config.logical_axis_rules:
    if name != logical_name:
      continue
    if axes is None:
      return 1
    n = 1
    for a in ([axes] if isinstance(axes, str) else axes):
      if a not in sizes:
        raise errors.ConfigError(f"config.logical_axis_rules: {name!r} maps to unknown mesh "
                                 f"axis {a!r}; mesh axes are {MESH_AXES}")
      n *= sizes[a]
    return n
  return 1


def batch_ways(config: ml_collections.ConfigDict, mesh_shape: tuple[int, ...]) -> int:
  """How many ways the rules split the batch ('act_batch') on this mesh."""
  return mesh_ways(config, mesh_shape, "act_batch")


def batch_axes(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The mesh axes the rules split the batch ('act_batch') over, major first."""
  for name, axes in config.logical_axis_rules:
    if name == "act_batch":
      if axes is None:
        return ()
      axes = (axes,) if isinstance(axes, str) else tuple(axes)
      unknown = [a for a in axes if a not in MESH_AXES]
      if unknown:
        raise errors.ConfigError(f"config.logical_axis_rules: 'act_batch' maps to unknown mesh "
                                 f"axis {unknown[0]!r}; mesh axes are {MESH_AXES}")
      return axes
  return ()


def batch_shard_grid(config: ml_collections.ConfigDict,
                     mesh_shape: tuple[int, ...]) -> np.ndarray:
  """The batch shard each mesh position holds (mesh-shaped ints, 0 .. ways-1).

  A PartitionSpec (('data', 'fsdp'),) numbers the shards data-major, as here.
  """
  index = np.zeros(mesh_shape, np.int64)
  grids = np.indices(mesh_shape)
  for axis in batch_axes(config):
    i = MESH_AXES.index(axis)
    index = index * mesh_shape[i] + grids[i]
  return index


def simulated_processes(mesh_shape: tuple[int, ...], process_count: int) -> np.ndarray:
  """The process of each mesh position when the devices are in process order.

  jax.make_mesh reshapes CPU devices as given and GPU devices sorted by id,
  and both number a process's devices together: process p holds a block of
  `devices / processes` consecutive positions in row-major order.
  """
  n = math.prod(mesh_shape)
  return (np.arange(n) // (n // process_count)).reshape(mesh_shape)


def _rule_text(config: ml_collections.ConfigDict) -> str:
  axes = batch_axes(config)
  return f"config.logical_axis_rules 'act_batch' -> {list(axes) if axes else None}"


def check_process_layout(config: ml_collections.ConfigDict, processes: np.ndarray) -> None:
  """Refuses a mesh on which a batch shard lies on the devices of more than one process.

  Args:
    processes: the process index of each mesh position, mesh-shaped: for a
      real mesh `np.vectorize(lambda d: d.process_index)(mesh.devices)`, else
      `simulated_processes`.
  """
  mesh_shape = tuple(int(s) for s in processes.shape)
  process_count = len(np.unique(processes))
  if process_count == 1:
    return
  shards = batch_shard_grid(config, mesh_shape)
  ways = int(shards.max()) + 1
  devices = processes.size
  where = (f"config.mesh.shape={mesh_shape} ({devices} devices, {process_count} processes, "
           f"{devices // process_count} each) with {_rule_text(config)}")
  if ways < process_count or ways % process_count:
    tensor = mesh_shape[MESH_AXES.index("tensor")]
    hint = (f", e.g. config.mesh.shape=(-1, 1, {tensor}) with the default rules"
            if (devices // tensor) % process_count == 0 else "")
    raise errors.ConfigError(
        f"{where} splits the batch {ways} way(s): fewer batch shards than processes, or not "
        f"a multiple of them, so processes would share a shard and feed it different "
        f"examples. Make the batch ways (data × fsdp) a multiple of {process_count}{hint}")
  owners: dict[int, set[int]] = {}
  for shard, process in zip(shards.flat, processes.flat):
    owners.setdefault(int(shard), set()).add(int(process))
  shared = sorted(s for s, p in owners.items() if len(p) > 1)
  if shared:
    s = shared[0]
    raise errors.ConfigError(
        f"{where}: batch shard {s} (of {ways}) lies on the devices of processes "
        f"{sorted(owners[s])}, which would feed it different examples"
        f"{f' ({len(shared)} shards so)' if len(shared) > 1 else ''}. Each process's devices "
        "must hold whole batch shards: map 'act_batch' to the mesh's leading axes "
        "(('data', 'fsdp') with the tensor axis innermost)")


def check_batch(config: ml_collections.ConfigDict, key: str, value: int,
                mesh_shape: tuple[int, ...], process_count: int) -> None:
  """A batch (`key`, e.g. 'input.batch_size') splits over the mesh's batch ways and the processes."""
  ways = batch_ways(config, mesh_shape)
  errors.require(value % ways == 0, key, value,
                 f"must be divisible by the {ways} ways config.mesh.shape={mesh_shape} "
                 f"splits the batch ({_rule_text(config)})")
  errors.require(value % process_count == 0, key, value,
                 f"must be divisible by the {process_count} processes (each reads "
                 f"{key.split('.')[-1]} / {process_count} examples of its own)")


def check(config: ml_collections.ConfigDict, num_devices: int,
          process_count: int = 1) -> tuple[int, ...]:
  """The mesh fits the devices and processes, and input.batch_size divides over it.

  Returns the mesh shape. The layout is simulated (devices in process order,
  `simulated_processes`); a trainer checks its real mesh with
  `check_process_layout` too.
  """
  try:
    mesh_shape = resolve_mesh_shape(config.mesh.shape, num_devices)
  except ValueError as e:
    raise errors.ConfigError(str(e)) from None
  if process_count < 1 or num_devices % process_count:
    raise errors.ConfigError(
        f"config.mesh.shape={tuple(config.mesh.shape)}: the {num_devices} devices do not split "
        f"evenly over {process_count} processes")
  check_batch(config, "input.batch_size", config.input.batch_size, mesh_shape, process_count)
  check_process_layout(config, simulated_processes(mesh_shape, process_count))
  return mesh_shape


def check_splits(config: ml_collections.ConfigDict, mesh_shape: tuple[int, ...],
                 sizes: dict[str, tuple[int, str]]) -> None:
  """Each {key: (value, logical axis)} divides by the ways the mesh splits that axis."""
  for key, (value, name) in sizes.items():
    ways = mesh_ways(config, mesh_shape, name)
    errors.require(value % ways == 0, key, value,
                   f"must be divisible by the {ways} ways the mesh {mesh_shape} splits '{name}'")
