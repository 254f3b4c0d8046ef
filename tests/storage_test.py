"""The path layer on a local folder and on a real GCS-protocol server."""
import json
import os
import urllib.request

import pytest

from phenaki_jax import storage


@pytest.fixture(params=["local", "gs"])
def root(request, tmp_path):
  if request.param == "local":
    return str(tmp_path / "root")
  return request.getfixturevalue("bucket") + "/root"


def test_write_read_list_and_remove(root):
  storage.write_json(storage.join(root, "run", "config.json"), {"a": 1})
  storage.write_text(storage.join(root, "run", "b.txt"), "two")
  storage.write_bytes(storage.join(root, "run", "sub", "c.bin"), b"\x00\x01")
  run = storage.join(root, "run")
  assert storage.read_json(storage.join(run, "config.json")) == {"a": 1}
  assert storage.listdir(run) == ["b.txt", "config.json", "sub"]
  assert storage.glob(run, "*.txt") == [storage.join(run, "b.txt")]
  assert storage.isdir(storage.join(run, "sub")) and storage.isfile(storage.join(run, "b.txt"))
  assert storage.size(storage.join(run, "sub", "c.bin")) == 2
  with storage.open_file(storage.join(run, "sub", "c.bin")) as f:
    assert f.read() == b"\x00\x01"
  with storage.local_copy(storage.join(run, "b.txt")) as local:
    assert open(local).read() == "two"
  with storage.local_folder_copy(run) as local:
    assert sorted(os.listdir(local)) == ["b.txt", "config.json", "sub"]
    assert open(os.path.join(local, "sub", "c.bin"), "rb").read() == b"\x00\x01"
  storage.rename(storage.join(run, "sub"), storage.join(root, "aside"))
  assert storage.listdir(root) == ["aside", "run"]
  assert storage.read_bytes(storage.join(root, "aside", "c.bin")) == b"\x00\x01"
  storage.remove(storage.join(run, "b.txt"))
  assert not storage.exists(storage.join(run, "b.txt"))
  storage.rmtree(root)
  assert not storage.exists(storage.join(root, "run", "config.json"))


def test_names_keep_the_scheme():
  assert storage.join("gs://b/run", "x", "y.json") == "gs://b/run/x/y.json"
  assert storage.dirname("gs://b/run/x.json") == "gs://b/run"
  assert storage.dirname("gs://b") == "gs://b"
  assert storage.basename("gs://b/run/") == "run"
  assert storage.absolute("gs://b/run") == "gs://b/run"
  assert storage.absolute("rel") == os.path.abspath("rel")


def test_appends_survive_a_reopen(root):
  p = storage.join(root, "metrics.jsonl")
  log = storage.AppendOnlyText(p)
  log.append("1\n")
  log.append("2\n")
  again = storage.AppendOnlyText(p)  # a resumed run
  again.append("3\n")
  assert storage.read_text(p) == "1\n2\n3\n"
  again.replace("1\n")
  assert storage.read_text(p) == "1\n"


def test_a_failed_staged_write_publishes_nothing_and_keeps_the_old_file(root):
  p = storage.join(root, "shard.bin")
  storage.write_bytes(p, b"old")
  with pytest.raises(RuntimeError):
    with storage.staged_file(p) as local:
      with open(local, "wb") as f:
        f.write(b"half")
      raise RuntimeError("the writer died")
  assert storage.read_bytes(p) == b"old"
  with storage.staged_file(p) as local:
    with open(local, "wb") as f:
      f.write(b"new")
  assert storage.read_bytes(p) == b"new"
  assert storage.listdir(root) == ["shard.bin"]  # no temporary left beside it


def test_missing_things_are_errors_that_name_the_path(root):
  missing = storage.join(root, "nothing", "here.json")
  with pytest.raises(storage.StorageNotFoundError, match=missing.replace(".", r"\.")):
    storage.read_json(missing)
  with pytest.raises(FileNotFoundError, match="nothing"):
    storage.listdir(storage.join(root, "nothing"))
  storage.write_text(storage.join(root, "bad.json"), "{not json")
  with pytest.raises(storage.StorageError, match=r"bad\.json: not valid JSON"):
    storage.read_json(storage.join(root, "bad.json"))


def test_a_bucket_that_does_not_exist_is_named(gcs_emulator):
  with pytest.raises(storage.StorageNotFoundError, match="bucket gs://no-such-bucket does not exist"):
    storage.read_text("gs://no-such-bucket/run/config.json")
  with pytest.raises(storage.StorageNotFoundError, match="workdir=gs://no-such-bucket/run"):
    storage.check_writable_root("gs://no-such-bucket/run", "workdir")
  with pytest.raises(storage.StorageError, match="gs://no-such-bucket/run/x.json"):
    storage.write_json("gs://no-such-bucket/run/x.json", {})


def test_a_write_into_a_vanished_bucket_fails_naming_the_object(gcs_emulator, bucket):
  storage.write_text(bucket + "/kept.txt", "committed")
  name = bucket[len("gs://"):]
  # Empty and delete the bucket behind the client's back, as another user might.
  storage.remove(bucket + "/kept.txt")
  req = urllib.request.Request(f"{gcs_emulator.url}/storage/v1/b/{name}", method="DELETE")
  urllib.request.urlopen(req, timeout=10).read()
  with pytest.raises(storage.StorageError, match=f"{bucket}/later.txt"):
    storage.write_text(bucket + "/later.txt", "lost")


def test_a_multi_chunk_overwrite_reads_back_whole(bucket):
  # Larger than one upload chunk: the object is replaced by all of the new bytes.
  p = bucket + "/tokenizer.json"
  storage.write_json(p, {"step": 1})
  big = {"step": 2, "pad": "x" * (3 << 20)}  # several upload chunks
  storage.write_json(p, big)
  assert json.loads(storage.read_text(p)) == big
