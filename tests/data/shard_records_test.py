"""Damaged shards: bad records are skipped and reported, the stream keeps its shape."""
import logging
import os
import pickle

import msgpack
import numpy as np
import pytest
from array_record.python import array_record_module

from phenaki_jax.config import schema
from phenaki_jax.data import pipeline, sources
from phenaki_jax.data.shard_records import UnreadableShardsError
from phenaki_jax.data import token_shards
from tests.helpers import load_config

_FRAMES, _RES = 5, 16


def _clip(i: int) -> np.ndarray:
  return np.full((_FRAMES, _RES, _RES, 3), i, np.uint8)


def _write(path: str, records: list[bytes]) -> None:
  # Uncompressed, so a record's bytes can be found (and damaged) in the file.
  writer = array_record_module.ArrayRecordWriter(path, "group_size:1,uncompressed")
  for r in records:
    writer.write(r)
  writer.close()


def _clip_record(i: int) -> bytes:
  return sources.encode_clip_record(_clip(i), kind="video", caption=f"caption-{i:03d}",
                                    source=f"clip{i}.mp4")


def _damage(path: str, marker: bytes) -> None:
  """Flips bytes of the record holding `marker`: its chunk then fails its checksum."""
  data = bytearray(open(path, "rb").read())
  at = data.index(marker)
  assert data.find(marker, at + 1) == -1
  for k in range(at, at + len(marker)):
    data[k] ^= 0xFF
  with open(path, "wb") as f:
    f.write(bytes(data))


@pytest.fixture
def shard_dir(tmp_path):
  """Two shards of 5 clips each (clip i is filled with value i); clip 2 damaged."""
  folder = tmp_path / "video"
  folder.mkdir()
  for s in range(2):
    _write(str(folder / f"clips-{s:05d}{sources.SHARD_SUFFIX}"),
           [_clip_record(5 * s + i) for i in range(5)])
  _damage(str(folder / f"clips-00000{sources.SHARD_SUFFIX}"), b"caption-002")
  return folder


def test_damaged_record_is_replaced_by_the_next_and_reported_by_file_and_position(
    shard_dir, caplog):
  source = sources.ClipShardSource(str(shard_dir))
  assert len(source) == 10
  with caplog.at_level(logging.WARNING):
    values = [int(source[i]["frames"][0, 0, 0, 0]) for i in range(10)]
  # Record 2 reads as record 3; nothing else moves.
  assert values == [0, 1, 3, 3, 4, 5, 6, 7, 8, 9]
  assert source[2]["caption"] == "caption-003"
  assert list(source.records.damaged) == [2]
  assert "record 2 of" in caplog.text and "clips-00000" in caplog.text
  assert "checksum" in caplog.text or "hash mismatch" in caplog.text
  # Reported once per record, however often it is read.
  assert caplog.text.count("damaged clip record") == 1
  # Batched reads (what grain calls) give the same examples.
  batch = source.__getitems__(list(range(10)))
  assert [int(e["frames"][0, 0, 0, 0]) for e in batch] == values


def test_source_with_a_damaged_record_pickles_for_grain_workers(shard_dir):
  source = pickle.loads(pickle.dumps(sources.ClipShardSource(str(shard_dir))))
  assert [int(source[i]["frames"][0, 0, 0, 0]) for i in (1, 2, 9)] == [1, 3, 9]


def test_last_record_damaged_wraps_to_the_first(tmp_path):
  path = str(tmp_path / f"a{sources.SHARD_SUFFIX}")
  _write(path, [_clip_record(i) for i in range(3)])
  _damage(path, b"caption-002")
  source = sources.ClipShardSource(path)
  assert int(source[2]["frames"][0, 0, 0, 0]) == 0


def test_payload_that_does_not_decode_is_skipped(tmp_path, caplog):
  good = msgpack.unpackb(_clip_record(7), raw=False)
  short = dict(good, frames=good["frames"][:-10])  # raw pixels cut short
  bad_png = dict(good, codec="png", frames=[b"not a png"] * _FRAMES)
  path = str(tmp_path / f"a{sources.SHARD_SUFFIX}")
  _write(path, [_clip_record(0), msgpack.packb(short), b"\xc1 not msgpack",
                msgpack.packb(bad_png), _clip_record(4)])
  with caplog.at_level(logging.WARNING):
    source = sources.ClipShardSource(path)
    values = [int(source[i]["frames"][0, 0, 0, 0]) for i in range(5)]
  assert values == [0, 4, 4, 4, 4]
  assert sorted(source.records.damaged) == [1, 2, 3]
  assert "frames do not decode" in caplog.text and "not msgpack" in caplog.text


def test_records_of_another_format_or_newer_version_are_errors_not_damage(tmp_path):
  good = msgpack.unpackb(_clip_record(0), raw=False)
  for record, message in ((dict(good, version=sources.RECORD_VERSION + 1), "newer"),
                          (dict(good, fmt="something/else"), "not a phenaki_jax clip")):
    path = str(tmp_path / f"{message[:3]}{sources.SHARD_SUFFIX}")
    _write(path, [msgpack.packb(record)])
    with pytest.raises(ValueError, match=message):
      sources.ClipShardSource(path)[0]


def test_truncated_shard_is_left_out_and_named(shard_dir, caplog):
  second = str(shard_dir / f"clips-00001{sources.SHARD_SUFFIX}")
  data = open(second, "rb").read()
  with open(second, "wb") as f:
    f.write(data[:1000])
  with caplog.at_level(logging.WARNING):
    source = sources.ClipShardSource(str(shard_dir))
  assert len(source) == 5 and source.paths == [str(shard_dir / f"clips-00000{sources.SHARD_SUFFIX}")]
  assert f"clip shard {second} cannot be opened and is left out" in caplog.text
  # When nothing is readable the error names every file.
  with open(str(shard_dir / f"clips-00000{sources.SHARD_SUFFIX}"), "wb") as f:
    f.write(b"junk")
  with pytest.raises(UnreadableShardsError, match="clips-00000.*clips-00001"):
    sources.ClipShardSource(str(shard_dir))


def test_every_record_damaged_is_an_error_naming_the_shard(tmp_path):
  path = str(tmp_path / f"a{sources.SHARD_SUFFIX}")
  _write(path, [b"\xc1"] * 3)
  with pytest.raises(UnreadableShardsError, match="3 consecutive clip records from record 1 of"):
    sources.ClipShardSource(path)[1]


def test_training_stream_over_a_damaged_shard_keeps_full_batches(shard_dir):
  config = schema.complete(load_config("cvivit", "tiny"))
  with config.unlocked():
    config.input.data = "shards"
    config.input.video_shards = str(shard_dir)
    config.input.video_ratio = 1.0
    config.input.batch_size = 4
  it = iter(pipeline.make_train_dataset(config.input, seed=0))
  seen = []
  for _ in range(5):  # two epochs
    frames = next(it)["frames"]
    assert frames.shape == (4, _FRAMES, _RES, _RES, 3)
    seen += [int(v) for v in frames[:, 0, 0, 0, 0]]
  assert 2 not in seen and set(seen) == set(range(10)) - {2}


def test_damaged_token_record_is_skipped(tmp_path, caplog):
  folder = tmp_path / "video"
  folder.mkdir()
  records = [token_shards.encode_token_record(np.full((2, 2, 2), i), kind="video",
                                             caption=f"caption-{i:03d}") for i in range(4)]
  path = str(folder / f"tokens-00000{sources.SHARD_SUFFIX}")
  _write(path, records)
  _damage(path, b"caption-001")
  with caplog.at_level(logging.WARNING):
    source = token_shards.TokenShardSource(str(tmp_path), "video", max_length=8)
    codes = [int(source[i]["codes"][0, 0, 0]) for i in range(4)]
  assert codes == [0, 2, 2, 3]
  assert "damaged token record 1 of" in caplog.text and os.path.basename(path) in caplog.text
