"""Pre-tokenised generator input: the offline job, its records, and training on them."""
import json
import os

import numpy as np
import pytest

from phenaki_jax.config import schema
from phenaki_jax.data import pipeline, pretokenize, synthetic
from phenaki_jax.tokenizer import Tokenizer
from phenaki_jax.train import train_cvivit, train_maskgit
from phenaki_jax.text import encoder as text_encoder
from phenaki_jax.data import token_shards
from tests.helpers import load_config, prepare_media, write_tiny_t5x


def _train_tokenizer(workdir, seed=0):
  config = load_config("cvivit", "tiny,l2vq")
  config.total_steps, config.checkpoint_every_steps, config.eval_every_steps = 1, 1, 0
  config.seed = seed
  train_cvivit.train_and_evaluate(config, workdir)
  return workdir


@pytest.fixture(scope="module")
def tokenizer_dir(trained):
  """The session's `:tiny,l2vq` tokenizer (1 step; tests/conftest.py): the one _train_tokenizer makes."""
  return trained[0]


@pytest.fixture(scope="module")
def tokens_dir(tokenizer_dir, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("tokens"))
  config = load_config("pretokenize", "tiny")
  config.tokenizer.workdir = tokenizer_dir
  pretokenize.run(config, out)
  return out


@pytest.fixture(scope="module")
def prepared_with_eval(tmp_path_factory):
  """The test media prepared for the :tiny tokenizer, 30% of the files held out (2 videos, 7 clips)."""
  out = str(tmp_path_factory.mktemp("prepared"))
  prepare_media(out, eval_fraction=0.3)
  return out


def _pretokenize_shards(tokenizer_dir, video_shards, out, num_eval_examples, image_shards=None):
  config = load_config("pretokenize", "tiny")
  config.tokenizer.workdir = tokenizer_dir
  config.input.data = "shards"
  config.input.video_shards = video_shards
  config.input.image_shards = image_shards or video_shards
  config.num_video_examples = config.num_image_examples = -1
  config.num_eval_examples = num_eval_examples
  return config, pretokenize.run(config, str(out))


def _maskgit(tokenizer_dir, tokens_dir, **top):
  config = load_config("maskgit", "tiny")
  config.tokenizer.workdir = tokenizer_dir
  config.input.data, config.input.token_shards = "tokens", tokens_dir
  for k, v in top.items():
    config[k] = v
  return config


def test_records_hold_exactly_the_tokenizer_codes_of_the_source_clips(tokenizer_dir, tokens_dir):
  tok = Tokenizer.load(tokenizer_dir)
  config = schema.complete(load_config("pretokenize", "tiny"))
  video, image = pipeline.make_sources(config.input, config.seed)
  for split, source, n in (("video", video, 16), ("image", image, 8)):
    records = token_shards.TokenShardSource(tokens_dir, split, max_length=40)
    assert len(records) == n
    frames = np.stack([source[i]["frames"] for i in range(n)])
    want = np.asarray(tok.encode(frames))
    got = np.stack([records[i]["codes"] for i in range(n)])
    np.testing.assert_array_equal(got, want)
    assert [records[i]["caption"] for i in range(n)] == [source[i]["caption"] for i in range(n)]
    assert "text_embeddings" not in records[0]  # the byte encoder trains: no cache
  meta = json.load(open(os.path.join(tokens_dir, "metadata.json")))
  assert meta["complete"] and meta["tokenizer"]["step"] == 1
  assert meta["splits"]["video"]["token_grid"] == [3, 4, 4]
  assert meta["splits"]["image"]["token_grid"] == [1, 4, 4]
  # Held-out clips come from the eval stream, as the on-the-fly trainer draws them.
  held_out, _ = pipeline.eval_clips(config.input, seed=0, count=4)
  eval_records = token_shards.TokenShardSource(tokens_dir, "eval", 40)
  np.testing.assert_array_equal(np.stack([eval_records[i]["codes"] for i in range(4)]),
                                np.asarray(tok.encode(held_out)))


def test_generator_trains_checkpoints_and_resumes_on_tokens(tokenizer_dir, tokens_dir, tmp_path):
  config = _maskgit(tokenizer_dir, tokens_dir, total_steps=3, eval_every_steps=3,
                    num_eval_examples=4)
  out = train_maskgit.train_and_evaluate(config, str(tmp_path / "tokens"))
  assert out["step"] == 3 and np.isfinite(out["train"]["train/loss"])
  assert "eval/loss" in out["eval"]
  # Resuming on tokens continues from the checkpoint.
  config = _maskgit(tokenizer_dir, tokens_dir, total_steps=4, eval_every_steps=0)
  assert train_maskgit.train_and_evaluate(config, str(tmp_path / "tokens"))["step"] == 4


def test_tokens_of_another_tokenizer_are_refused_naming_both(tokens_dir, tmp_path):
  other = _train_tokenizer(str(tmp_path / "other_tokenizer"), seed=1)
  config = _maskgit(other, tokens_dir)
  with pytest.raises(schema.ConfigError, match="config.input.token_shards=.*tokenizer"):
    train_maskgit.train_and_evaluate(config, str(tmp_path / "run"))


def test_augmentation_and_a_missing_folder_fail_before_compiling(tokenizer_dir, tmp_path):
  config = _maskgit(tokenizer_dir, "")
  with pytest.raises(schema.ConfigError, match="config.input.token_shards=''"):
    train_maskgit.train_and_evaluate(config, str(tmp_path / "a"))
  config = _maskgit(tokenizer_dir, str(tmp_path / "nothing"))
  config.input.horizontal_flip = True
  with pytest.raises(schema.ConfigError, match="augmented"):
    train_maskgit.train_and_evaluate(config, str(tmp_path / "b"))
  config = _maskgit(tokenizer_dir, str(tmp_path / "nothing"))
  with pytest.raises(FileNotFoundError, match="metadata.json"):
    train_maskgit.train_and_evaluate(config, str(tmp_path / "c"))


def test_frozen_t5_embeddings_are_cached_and_used_instead_of_the_encoder(tokenizer_dir,
                                                                          tmp_path):
  pytest.importorskip("sentencepiece")
  captions = [synthetic.caption_for(synthetic.sample_spec(np.random.default_rng(i), 16, 5))
              for i in range(200)]
  t5_path, _ = write_tiny_t5x(tmp_path, captions)
  out = str(tmp_path / "tokens_t5")
  config = load_config("pretokenize", "tiny")
  config.tokenizer.workdir = tokenizer_dir
  config.text.encoder, config.text.t5_path = "t5", t5_path
  meta = pretokenize.run(config, out)
  assert meta["text"]["cached"] and meta["text"]["width"] == 16

  # The cached embeddings are the frozen encoder's outputs (to bfloat16 precision).
  text_cfg = schema.complete(load_config("maskgit", "tiny")).text
  text_cfg.encoder, text_cfg.t5_path = "t5", t5_path
  text_cfg.max_length = 40
  text = text_encoder.build_text_encoder(text_cfg)
  records = token_shards.TokenShardSource(out, "video", max_length=40)
  ids, mask = text.tokenizer.encode_batch([records[i]["caption"] for i in range(4)], 40)
  want = np.asarray(text.module.apply({"params": text.pretrained}, ids, mask)[0])
  for i in range(4):
    got = records[i]["text_embeddings"].astype(np.float32)
    np.testing.assert_array_equal(records[i]["text_mask"], mask[i])
    np.testing.assert_allclose(got[mask[i]], want[i][mask[i]], rtol=1e-2, atol=1e-2)
    assert not got[~mask[i]].any()

  config = _maskgit(tokenizer_dir, out, total_steps=2, eval_every_steps=2, num_eval_examples=4)
  config.text.encoder, config.text.t5_path = "t5", t5_path
  batch = next(iter(pipeline.make_train_dataset(
      schema.complete(config).input, seed=0, keep_caption=True, text_max_length=40)))
  assert "caption" not in batch and batch["text_embeddings"].shape[1:] == (40, 16)
  assert train_maskgit.train_and_evaluate(config, str(tmp_path / "run"))["step"] == 2
  # Embeddings made for another max_length are refused, naming the key.
  config.text.max_length = 32
  with pytest.raises(schema.ConfigError, match="text.max_length"):
    train_maskgit.train_and_evaluate(config, str(tmp_path / "run2"))


@pytest.mark.parametrize("count,processes", [(10, 2), (7, 3), (2, 4), (0, 2)])
def test_processes_take_contiguous_shares_that_cover_every_example_once(count, processes):
  shares = [pretokenize.process_range(count, i, processes) for i in range(processes)]
  assert [i for share in shares for i in share] == list(range(count))
  assert max(map(len, shares)) - min(map(len, shares)) <= 1
  names = sorted(pretokenize.shard_prefix(i, processes) + "-000" for i in range(processes))
  assert names == [pretokenize.shard_prefix(i, processes) + "-000" for i in range(processes)]


def test_merged_summary_lists_shards_in_reading_order_and_counts_all():
  parts = [{"video": {"records": n, "token_grid": [5, 4, 4] if n else None, "seconds": s,
                      "shards": [{"file": f"tokens-p{i:03d}-000.array_record", "records": n}]}}
           for i, (n, s) in enumerate(((5, 2.0), (4, 3.0), (0, 0.1)))]
  merged = pretokenize.merge_splits(parts)["video"]
  assert merged["records"] == 9 and merged["records_per_process"] == [5, 4, 0]
  assert merged["token_grid"] == [5, 4, 4] and merged["seconds"] == 3.0
  assert [s["file"] for s in merged["shards"]] == [
      f"tokens-p{i:03d}-000.array_record" for i in range(3)]


def test_the_prepared_eval_split_is_encoded_as_the_held_out_clips(tokenizer_dir,
                                                                   prepared_with_eval, tmp_path):
  tok = Tokenizer.load(tokenizer_dir)
  config, meta = _pretokenize_shards(tokenizer_dir, prepared_with_eval, tmp_path / "a", 4)
  assert meta["splits"]["eval"]["records"] == 4
  assert meta["eval_from"].startswith(f"held out: the eval split of {prepared_with_eval}")
  # The clips the on-the-fly trainer evaluates on (evenly spaced over the split), as codes.
  clips, captions = pipeline.eval_clips(schema.complete(config).input, seed=0, count=4)
  records = token_shards.TokenShardSource(str(tmp_path / "a"), "eval", 40)
  np.testing.assert_array_equal(np.stack([records[i]["codes"] for i in range(4)]),
                                np.asarray(tok.encode(clips)))
  assert [records[i]["caption"] for i in range(4)] == captions
  train = token_shards.TokenShardSource(str(tmp_path / "a"), "video", 40)
  assert not {records[i]["caption"] for i in range(4)} & {train[i]["caption"]
                                                           for i in range(len(train))}
  # The generator's eval on these tokens says where its held-out clips came from.
  maskgit = schema.complete(_maskgit(tokenizer_dir, str(tmp_path / "a")))
  said, held_out = pipeline.eval_source(maskgit.input)
  assert held_out and "encoded from the eval split of" in said, said
  # More than the split holds: all 7 clips, not an error.
  _, meta = _pretokenize_shards(tokenizer_dir, prepared_with_eval, tmp_path / "b", 100)
  assert meta["splits"]["eval"]["records"] == 7


def test_shards_with_no_held_out_part_write_no_eval_split_and_say_so(tokenizer_dir,
                                                                      prepared_with_eval,
                                                                      tmp_path, caplog):
  train_shards = os.path.join(prepared_with_eval, "video", "video-00000-000.array_record")
  _, meta = _pretokenize_shards(tokenizer_dir, train_shards, tmp_path / "tokens", 4,
                                image_shards=prepared_with_eval)
  assert "eval" not in meta["splits"] and meta["eval_from"] is None
  assert "no 'eval' split written: training clips" in caplog.text
  maskgit = schema.complete(_maskgit(tokenizer_dir, str(tmp_path / "tokens")))
  said, held_out = pipeline.eval_source(maskgit.input)
  assert not held_out and said.startswith("training clips"), said
