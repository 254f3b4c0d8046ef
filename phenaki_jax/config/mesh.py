"""The mesh section: `mesh.shape` and `logical_axis_rules`, and what must divide over them.

A trainer's weights are created sharded and its batch is split over the mesh,
so sizes that do not divide evenly fail here, naming the key, before anything
compiles.
"""
from __future__ import annotations

from typing import Any, Iterable, Sequence

import ml_collections

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


def check(config: ml_collections.ConfigDict, num_devices: int,
          process_count: int = 1) -> tuple[int, ...]:
  """The mesh fits the devices and input.batch_size divides over it; returns its shape."""
  try:
    mesh_shape = resolve_mesh_shape(config.mesh.shape, num_devices)
  except ValueError as e:
    raise errors.ConfigError(str(e)) from None
  b = config.input.batch_size
  ways = batch_ways(config, mesh_shape)
  errors.require(b % ways == 0, "input.batch_size", b,
                 f"must be divisible by the {ways} ways the mesh {mesh_shape} splits the batch")
  errors.require(b % process_count == 0, "input.batch_size", b,
                 f"must be divisible by the {process_count} processes")
  return mesh_shape


def check_splits(config: ml_collections.ConfigDict, mesh_shape: tuple[int, ...],
                 sizes: dict[str, tuple[int, str]]) -> None:
  """Each {key: (value, logical axis)} divides by the ways the mesh splits that axis."""
  for key, (value, name) in sizes.items():
    ways = mesh_ways(config, mesh_shape, name)
    errors.require(value % ways == 0, key, value,
                   f"must be divisible by the {ways} ways the mesh {mesh_shape} splits '{name}'")
