"""Device meshes and the mapping from logical axis names to them.

Models name their axes logically; the config's rules say which mesh axis
('data', 'fsdp', 'tensor') each name lives on. Everything here works the same
for 1 CPU device, 8 simulated ones, or a pod slice.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

# The mesh's axes and how a config's shape fills its -1, defined with the config's checks.
from phenaki_jax.config.mesh import MESH_AXES, resolve_mesh_shape

Rules = Sequence[tuple[str, Any]]


def make_mesh(shape: Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ('data', 'fsdp', 'tensor') mesh with Auto axes (needed by flax constraints)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = resolve_mesh_shape(shape, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: Rules) -> Iterator[None]:
  """Enter a mesh and logical rules together.

  `jax.set_mesh` (not the deprecated `with mesh:`) is what makes flax's
  activation constraints reach the lowered program.
  """
  with jax.set_mesh(mesh), nn.logical_axis_rules(as_rules(rules)):
    yield


def as_rules(rules: Rules) -> tuple[tuple[str, Any], ...]:
  """Config rules (lists from JSON/ConfigDict) -> flax's tuple form."""
  out = []
  for name, axes in rules:
    if isinstance(axes, list):
      axes = tuple(axes)
    out.append((str(name), axes))
  return tuple(out)


def logical_sharding(mesh: Mesh, rules: Rules, *logical_axes: str | None) -> NamedSharding:
  spec = nn.logical_to_mesh_axes(logical_axes, as_rules(rules))
  return NamedSharding(mesh, spec)


def tree_shardings(boxed_tree: Any, mesh: Mesh, rules: Rules) -> Any:
  """NamedShardings for an (abstract) tree holding nn.LogicallyPartitioned boxes.

  The result has the structure of the unboxed tree (empty nodes such as
  optax's MaskedNode stay empty); leaves without names are replicated.
  """
  rules = as_rules(rules)

  def one(x: Any) -> Any:
    if isinstance(x, nn.Partitioned) and not jax.tree.leaves(x.value):
      # An empty node in a box (optax.multi_transform masks other groups' leaves).
      return x.value
    if isinstance(x, nn.LogicallyPartitioned):
      return NamedSharding(mesh, nn.logical_to_mesh_axes(x.names, rules))
    if isinstance(x, nn.Partitioned):
      return NamedSharding(mesh, PartitionSpec(*x.names))
    return NamedSharding(mesh, PartitionSpec())

  return jax.tree.map(one, boxed_tree, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def strip_boxes(tree: Any) -> Any:
  """Removes nn.Partitioned boxes without applying their sharding constraint.

  (nn.unbox constrains each leaf, which only works while tracing; this also
  works on the ShapeDtypeStructs from eval_shape.)
  """
  is_box = lambda x: isinstance(x, nn.Partitioned)
  return jax.tree.map(lambda x: x.value if is_box(x) else x, tree, is_leaf=is_box)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
  """Sharding of input batches: the leading axis along the batch rule."""
  return logical_sharding(mesh, rules, "act_batch")


def host_to_global(local_batch: Any, sharding: NamedSharding) -> Any:
  """Process-local numpy batch -> global jax.Arrays laid out by `sharding`."""
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                      local_batch)


def place(tree: Any, shardings: Any) -> Any:
  """Host (numpy) values -> global arrays with `shardings`; works on several processes."""
  def one(x, s):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, s, lambda index: x[index])
  return jax.tree.map(one, tree, shardings)
