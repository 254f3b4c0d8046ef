"""The mesh checks against the process layout: refused before anything compiles, keys named.

Every check runs on a simulated layout (num_devices, process_count), so one
process tests what a pod would meet.
"""
import jax
import numpy as np
import pytest

from phenaki_jax import sharding
from phenaki_jax.config import mesh, schema
from tests.helpers import load_config


def _cvivit(batch_size=8, mesh_shape=(-1, 1, 1), batch_rule=None):
  config = schema.complete(load_config("cvivit", "tiny"))
  config.input.batch_size = batch_size
  config.mesh.shape = mesh_shape
  if batch_rule is not None:
    config.logical_axis_rules = [[n, batch_rule if n == "act_batch" else a]
                                 for n, a in config.logical_axis_rules]
  return config


def test_a_batch_the_mesh_cannot_split():
  with pytest.raises(schema.ConfigError, match=r"config.input.batch_size=6: must be divisible "
                     r"by the 4 ways config.mesh.shape=\(4, 1, 1\) splits the batch "
                     r"\(config.logical_axis_rules 'act_batch' -> \['data', 'fsdp'\]\)"):
    schema.validate_cvivit(_cvivit(batch_size=6), 4)


def test_a_per_process_batch_that_is_not_whole():
  # One batch way (tensor-parallel only): 3 divides over the mesh, not over 2 processes.
  with pytest.raises(schema.ConfigError, match=r"config.input.batch_size=3: must be divisible "
                                               r"by the 2 processes"):
    schema.validate_cvivit(_cvivit(batch_size=3, mesh_shape=(1, 1, 2)), 2, process_count=2)


@pytest.mark.parametrize("mesh_shape,devices,processes,ways", [
    ((1, 1, 8), 8, 2, 1),  # fewer batch shards than processes
    ((2, 1, 4), 8, 4, 2),
    ((3, 1, 2), 6, 2, 3),  # as many or more, but not a multiple: shard 1 spans processes 0, 1
])
def test_fewer_batch_shards_than_processes(mesh_shape, devices, processes, ways):
  config = _cvivit(batch_size=12, mesh_shape=mesh_shape)
  config.model.num_heads = 8
  with pytest.raises(schema.ConfigError) as e:
    schema.validate_cvivit(config, devices, process_count=processes)
  message = str(e.value)
  for part in (f"config.mesh.shape={mesh_shape} ({devices} devices, {processes} processes",
               "config.logical_axis_rules 'act_batch' -> ['data', 'fsdp']",
               f"splits the batch {ways} way(s)", f"a multiple of {processes}"):
    assert part in message, message


def test_batch_shards_on_several_processes_by_the_rules():
  # 'act_batch' on fsdp alone: 2 shards for 2 processes, but each process's
  # devices (one row of data) hold both, so both processes feed each shard.
  config = _cvivit(mesh_shape=(2, 2, 1), batch_rule="fsdp")
  with pytest.raises(schema.ConfigError, match=r"config.mesh.shape=\(2, 2, 1\) .* "
                     r"config.logical_axis_rules 'act_batch' -> \['fsdp'\]: batch shard 0 \(of "
                     r"2\) lies on the devices of processes \[0, 1\]"):
    schema.validate_cvivit(config, 4, process_count=2)
  schema.validate_cvivit(config, 4, process_count=1)  # one process: nothing to share


def test_the_generator_trainer_checks_the_layout_too():
  config = schema.complete(load_config("maskgit", "tiny"))
  config.tokenizer.workdir = "unused"
  config.mesh.shape = (1, 1, 2)
  config.model.num_heads = 2
  with pytest.raises(schema.ConfigError, match=r"splits the batch 1 way\(s\)"):
    schema.validate_maskgit(config, 2, process_count=2)


@pytest.mark.parametrize("mesh_shape,devices,processes", [
    ((-1, 1, 1), 8, 8), ((4, 1, 2), 8, 4), ((2, 2, 2), 8, 2), ((1, 4, 2), 8, 4)])
def test_layouts_that_work_pass(mesh_shape, devices, processes):
  config = _cvivit(mesh_shape=mesh_shape)
  config.model.num_heads = 2
  schema.validate_cvivit(config, devices, process_count=processes)


def test_a_real_mesh_is_laid_out_as_simulated_here():
  # simulated_processes assumes make_mesh keeps the devices in process order
  # (CPU: as given; all ours are process 0 here, so compare the order itself).
  m = sharding.make_mesh((2, 2, 2))
  ids = np.vectorize(lambda d: d.id)(m.devices)
  assert ids.ravel().tolist() == [d.id for d in jax.devices()]
  order = np.argsort([d.id for d in jax.devices()]).reshape(2, 2, 2)
  np.testing.assert_array_equal(mesh.simulated_processes((2, 2, 2), 4), order // 2)
  config = _cvivit()
  mesh.check_process_layout(config, np.vectorize(lambda d: d.process_index)(m.devices))
  # A topology-ordered mesh (as on TPU) that interleaves processes over the tensor axis.
  with pytest.raises(schema.ConfigError, match=r"batch shard 0 \(of 2\) lies on the devices of "
                                               r"processes \[0, 1\]"):
    mesh.check_process_layout(_cvivit(mesh_shape=(2, 1, 2)), np.array([[[0, 1]], [[0, 1]]]))
