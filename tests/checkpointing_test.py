"""checkpointing: which steps count as saved (locally and in a bucket); restoring past damage."""
from phenaki_jax import checkpointing, storage


def test_a_local_step_is_finalized_once_orbax_gave_it_its_name(tmp_path):
  for name in ("3", "6", "9.orbax-checkpoint-tmp-1"):  # 9: still being written
    (tmp_path / "checkpoints" / name).mkdir(parents=True)
  assert checkpointing.finalized_steps(str(tmp_path)) == [3, 6]
  assert checkpointing.finalized_steps(str(tmp_path / "none")) == []


def test_a_bucket_step_is_finalized_only_once_its_commit_file_is_written(bucket):
  # On object storage orbax writes a step under its final name and commits it last.
  run = f"{bucket}/run"
  storage.write_text(f"{run}/checkpoints/3/state/manifest.ocdbt", "")
  storage.write_text(f"{run}/checkpoints/3/{checkpointing.COMMIT_SUCCESS_FILE}", "committed")
  storage.write_text(f"{run}/checkpoints/6/state/manifest.ocdbt", "")  # being saved
  assert checkpointing.finalized_steps(run) == [3]
  assert checkpointing.finalized_steps(f"{bucket}/none") == []


# --- Restoring past a damaged step (one process; the agreement across processes:
# tests/integration/multiprocess_faults_test.py).

def _saved(tmp_path, steps=(2, 4)):
  import jax
  ckpt = checkpointing.Checkpointer(str(tmp_path / "checkpoints"), max_to_keep=5,
                                    async_save=False)
  for step in steps:
    ckpt.save(step, {"w": jax.numpy.full((4,), float(step))}, None)
  abstract = {"w": jax.ShapeDtypeStruct((4,), jax.numpy.float32,
                                        sharding=jax.sharding.SingleDeviceSharding(
                                            jax.devices()[0]))}
  return ckpt, abstract


def _damage(tmp_path, step):
  import shutil
  shutil.rmtree(tmp_path / "checkpoints" / str(step) / "state" / "d")


def test_a_damaged_newest_step_is_skipped_named_and_set_aside_so_it_is_saved_again(tmp_path):
  import jax
  import pytest
  ckpt, abstract = _saved(tmp_path)
  _damage(tmp_path, 4)
  state, step = ckpt.restore_latest(abstract)
  assert (step, float(state["w"][0]), ckpt.skipped_steps) == (2, 2.0, [4])
  # Left in place, step 4 blocks orbax from saving any step up to it.
  assert not ckpt.save(3, {"w": jax.numpy.full((4,), 3.0)}, None)
  with pytest.raises(checkpointing.CheckpointRestoreError,
                     match="checkpoint step 4 in .* does not restore on this process"):
    ckpt.restore(4, abstract)
  where = ckpt.set_aside_steps([4])
  assert where == f"{tmp_path / 'checkpoints'}.unusable-0"
  assert sorted(p.name for p in (tmp_path / "checkpoints.unusable-0").iterdir()) == ["4"]
  assert ckpt.all_steps() == [2]
  assert ckpt.save(4, {"w": jax.numpy.full((4,), 4.5)}, None)
  state, step = ckpt.restore_latest(abstract)
  assert (step, float(state["w"][0]), ckpt.skipped_steps) == (4, 4.5, [])
  ckpt.close()


def test_max_step_bounds_the_candidates_and_skips_nothing_above(tmp_path):
  ckpt, abstract = _saved(tmp_path, steps=(2, 4, 6))
  _, step = ckpt.restore_latest(abstract, max_step=4)
  assert (step, ckpt.skipped_steps) == (4, [])
  assert checkpointing.agreed_steps([6, 2, 4]) == ([2, 4, 6], [])  # one process: its own
  ckpt.close()
