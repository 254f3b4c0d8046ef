"""checkpointing.finalized_steps: which steps count as saved, locally and in a bucket."""
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
