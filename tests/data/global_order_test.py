"""The data order is the job's, not the process count's (phenaki_jax/data/global_order.py)."""
import grain
import numpy as np
import pytest

from phenaki_jax.config import schema
from phenaki_jax.data import global_order, pipeline
from tests.helpers import load_config


def _input_cfg():
  config = schema.complete(load_config("cvivit", "tiny"))
  with config.unlocked():
    # Images and videos mixed, and every augmentation draw in play.
    config.input.update(video_ratio=0.5, batch_size=4, random_crop_min_scale=0.7,
                        horizontal_flip=True)
  return config.input


def _steps(cfg, index, count, steps):
  it = iter(pipeline.make_train_dataset(cfg, seed=5, process_index=index, process_count=count))
  return [next(it)["frames"] for _ in range(steps)], it.get_state()


@pytest.mark.parametrize("count", [2, 4])
def test_processes_together_read_the_one_process_batches(count):
  cfg = _input_cfg()
  whole, whole_state = _steps(cfg, 0, 1, 6)
  parts = [_steps(cfg, i, count, 6) for i in range(count)]
  assert len({f.shape[1] for f in whole}) == 2  # both kinds came
  for step, want in enumerate(whole):
    got = np.concatenate([frames[step] for frames, _ in parts])
    np.testing.assert_array_equal(got, want, err_msg=f"step {step + 1}, {count} processes")
  # The position is counted in batches: the same on every process, so a
  # checkpoint carries over to another process count.
  assert all(state == whole_state for _, state in parts)


def test_rows_map_to_their_global_positions_and_only_those_are_read():
  read = []

  def record(x):
    read.append(x)
    return x

  ds = grain.MapDataset.range(24).map(record)
  local = global_order.local_batches(ds, global_batch=6, process_index=1, process_count=3)
  assert len(local) == 4
  np.testing.assert_array_equal(local[0], [2, 3])
  np.testing.assert_array_equal(local[3], [20, 21])
  assert sorted(read) == [2, 3, 20, 21]
  with pytest.raises(ValueError, match="batch_size=6 must be a positive multiple of the 4"):
    global_order.ProcessRows(ds, global_batch=6, process_index=0, process_count=4)
