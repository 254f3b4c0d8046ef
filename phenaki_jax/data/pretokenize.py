"""Offline job: clips -> C-ViViT codes (+ frozen text embeddings) in ArrayRecord shards.

  python -m phenaki_jax.main --config=configs/pretokenize.py --workdir=data/tokens \
      --config.tokenizer.workdir=runs/cvivit
  python -m phenaki_jax.main --config=configs/maskgit.py --workdir=runs/maskgit \
      --config.input.data=tokens --config.input.token_shards=data/tokens

Phenaki's generator trains on pre-tokenised data: the frozen tokenizer (and a
frozen text encoder) would otherwise run on every example of every epoch.
This job runs them once. Output folder:

  video/tokens-NNN.array_record   the video clips' records
  image/tokens-NNN.array_record   the images' records (one token frame)
  eval/tokens-NNN.array_record    held-out clips, for the trainer's held-out
                                  loss: those pipeline.eval_clips reads (the
                                  built-in data's eval stream, the eval split
                                  configs/prepare.py wrote, input.eval_shards,
                                  input.tfds_eval_split); none when the data
                                  has no held-out part (the log says so)
  metadata.json                   what made them: the tokenizer checkpoint, its
                                  codebook and token grid, the text encoder and
                                  the embedding width, counts; 'complete': true
                                  once every shard is written

The record format and the reader: phenaki_jax/data/token_shards.py. Every
path (the workdir, the prepared shards read, the tokenizer) may be local or
`gs://`; shards are written whole (phenaki_jax/data/shard_writer.py) and
metadata.json last, so a reader never takes a half-written folder.
"""
from __future__ import annotations

import datetime
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm
from absl import logging
from jax.experimental import multihost_utils

from phenaki_jax import storage
from phenaki_jax.config import schema
from phenaki_jax.config.schema import ConfigError
from phenaki_jax import tokenizer as tokenizer_lib
from phenaki_jax.data import pipeline, shard_writer, token_shards
from phenaki_jax.text.encoder import build_text_encoder

# Where each process leaves its summary for process 0 (removed once merged).
PARTS_DIR = ".pretokenize-parts"

# --- The job.

def process_range(count: int, process_index: int, process_count: int) -> range:
  """The contiguous examples this process encodes: the first count % N processes take one more."""
  share, extra = divmod(count, process_count)
  start = process_index * share + min(process_index, extra)
  return range(start, start + share + (process_index < extra))


def shard_prefix(process_index: int, process_count: int) -> str:
  """Shard names sort in example order: process p's `tokens-pPPP-NNN` after p-1's."""
  return "tokens" if process_count == 1 else f"tokens-p{process_index:03d}"


def _encode_split(name: str, source: Any, count: int, tok: Any, text_fn: Any, batch_size: int,
                  out_dir: str, records_per_shard: int, process_index: int = 0,
                  process_count: int = 1) -> dict[str, Any]:
  """Encodes this process's share of `count` examples of `source` into out_dir/name/.

  Returns its summary (records, token grid, shards, seconds).
  """
  writer = shard_writer.ShardWriter(storage.join(out_dir, name),
                                    shard_prefix(process_index, process_count),
                                    records_per_shard, "group_size:1,zstd:3")
  indices = process_range(count, process_index, process_count)
  grid = None
  start = time.perf_counter()
  with tqdm.tqdm(total=len(indices), desc=f"pretokenize {name}", unit="clip",
                 disable=process_index != 0) as bar:
    for first in range(indices.start, indices.stop, batch_size):
      chunk = [source[i] for i in range(first, min(first + batch_size, indices.stop))]
      frames = np.stack([np.asarray(e["frames"], np.uint8) for e in chunk])
      captions = [str(e["caption"]) for e in chunk]
      n = len(chunk)
      if n < batch_size:  # one compiled shape: pad the last batch
        frames = np.concatenate([frames, np.repeat(frames[-1:], batch_size - n, axis=0)])
      codes = np.asarray(tok.encode(frames))[:n]
      grid = list(codes.shape[1:])
      embeddings = [None] * n
      if text_fn is not None:
        emb, lengths = text_fn(captions + [captions[-1]] * (batch_size - n))
        embeddings = [emb[i, :lengths[i]] for i in range(n)]
      for c, caption, e in zip(codes, captions, embeddings):
        writer.write(token_shards.encode_token_record(c, kind="image" if name == "image" else "video",
                                         caption=caption, text_embedding=e))
      bar.update(n)
  writer.close()
  seconds = time.perf_counter() - start
  return {"records": len(indices), "token_grid": grid, "shards": writer.shards,
          "seconds": round(seconds, 2)}


def merge_splits(parts: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
  """The processes' split summaries (in process order) as one, shards in reading order."""
  merged = {}
  for name in parts[0]:
    mine = [p[name] for p in parts]
    grids = [m["token_grid"] for m in mine if m["token_grid"] is not None]
    records = sum(m["records"] for m in mine)
    seconds = max(m["seconds"] for m in mine)  # the processes ran side by side
    merged[name] = {"records": records, "token_grid": grids[0] if grids else None,
                    "shards": [s for m in mine for s in m["shards"]], "seconds": seconds,
                    "clips_per_second": round(records / max(seconds, 1e-9), 2)}
    if len(parts) > 1:
      merged[name]["records_per_process"] = [m["records"] for m in mine]
  return merged


def _gather_splits(splits: dict[str, dict[str, Any]], workdir: str) -> list[dict[str, Any]]:
  """Every process's split summaries, on process 0 (through files in the workdir, which every
  host reaches: local on one machine, the bucket on a pod); [] on the others."""
  count, index = jax.process_count(), jax.process_index()
  if count == 1:
    return [splits]
  part = storage.join(workdir, PARTS_DIR, f"process-{index:03d}.json")
  storage.write_json(part, splits)
  multihost_utils.sync_global_devices("phenaki_jax_pretokenize_parts")
  if index != 0:
    return []
  paths = [storage.join(workdir, PARTS_DIR, f"process-{i:03d}.json") for i in range(count)]
  parts = [storage.read_json(p) for p in paths]
  storage.rmtree(storage.join(workdir, PARTS_DIR))
  return parts


def make_text_fn(text_cfg: ml_collections.ConfigDict) -> tuple[Any, dict[str, Any]]:
  """(captions -> (embeddings (B, L, D), lengths (B,)) or None, description for metadata)."""
  if text_cfg.encoder != "t5" or not text_cfg.frozen:
    return None, {"encoder": text_cfg.encoder, "cached": False,
                  "why": "a trainable text encoder cannot be cached; records keep captions"}
  text = build_text_encoder(text_cfg)
  params = jax.device_put(text.pretrained)
  apply = jax.jit(lambda p, ids, mask: text.module.apply({"params": p}, ids, mask)[0])

  def fn(captions: list[str]) -> tuple[np.ndarray, np.ndarray]:
    ids, mask = text.tokenizer.encode_batch(captions, text_cfg.max_length)
    emb = np.asarray(apply(params, jnp.asarray(ids), jnp.asarray(mask)), np.float32)
    return emb, mask.sum(axis=1)

  return fn, {"encoder": "t5", "cached": True, "t5_path": storage.absolute(text_cfg.t5_path),
              "vocab_path": text_cfg.vocab_path, "max_length": int(text_cfg.max_length),
              "width": int(text.width), "dtype": "bfloat16"}


class _Picked:
  """source[indices[i]] as its i-th example: the held-out clips, in the order they are read."""

  def __init__(self, source: Any, indices: list[int]):
    self._source, self._indices = source, indices

  def __len__(self) -> int:
    return len(self._indices)

  def __getitem__(self, i: int) -> Any:
    return self._source[self._indices[i]]


def _eval_count(input_cfg: ml_collections.ConfigDict, source: Any,
                config: ml_collections.ConfigDict) -> int:
  """num_eval_examples, or every held-out clip when a finite split holds fewer (said in the log)."""
  wanted = config.num_eval_examples
  if input_cfg.data == "shapes" or len(source) >= wanted:
    return wanted
  logging.warning("pretokenize: config.num_eval_examples=%d but the held-out clips number %d; "
                  "encoding all of them", wanted, len(source))
  return len(source)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Writes the token shards and metadata.json into `workdir`; returns the metadata."""
  config = schema.complete(config)
  schema.validate_pretokenize(config)
  if storage.exists(storage.join(workdir, token_shards.METADATA)):
    raise ConfigError(f"--workdir={workdir} already holds pretokenized data ({token_shards.METADATA}); "
                      "choose an empty folder")
  tok = tokenizer_lib.load_from_config(config.tokenizer)
  input_cfg = ml_collections.ConfigDict(config.input.to_dict())
  if input_cfg.resolution != tok.config.input.resolution:
    raise ConfigError(f"config.input.resolution={input_cfg.resolution}: the tokenizer in "
                      f"{config.tokenizer.workdir} was trained at {tok.config.input.resolution}")
  text_fn, text_meta = make_text_fn(config.text)
  video, image = pipeline.make_sources(input_cfg, config.seed)
  storage.check_writable_root(workdir, "--workdir")

  def count(source, wanted, key):
    n = len(source) if wanted < 0 else wanted
    if n > len(source):
      raise ConfigError(f"config.{key}={wanted}: the source holds only {len(source)} examples")
    return n

  splits = {}
  # On several processes each encodes a contiguous share on its own devices and
  # writes its own shards; process 0 writes metadata.json once all are done.
  args = dict(tok=tok, text_fn=text_fn, batch_size=config.batch_size, out_dir=workdir,
              records_per_shard=config.records_per_shard, process_index=jax.process_index(),
              process_count=jax.process_count())
  if video is not None:
    splits["video"] = _encode_split("video", video, count(video, config.num_video_examples,
                                                          "num_video_examples"), **args)
  if image is not None:
    splits["image"] = _encode_split("image", image, count(image, config.num_image_examples,
                                                          "num_image_examples"), **args)
  eval_from, held_out = pipeline.eval_source(input_cfg)
  if config.num_eval_examples > 0 and held_out:
    # The held-out clips the on-the-fly trainer would evaluate on (pipeline.eval_clips):
    # the eval seed stream of the built-in data, the prepared eval split, a TFDS eval split.
    source = pipeline.make_eval_source(input_cfg, config.seed)
    indices = pipeline.eval_indices(input_cfg, source, _eval_count(input_cfg, source, config))
    splits["eval"] = _encode_split("eval", _Picked(source, indices), len(indices), **args)
  elif config.num_eval_examples > 0:
    logging.warning("pretokenize: no 'eval' split written: %s. A generator trained on these "
                    "tokens evaluates on training clips.", eval_from)

  parts = _gather_splits(splits, workdir)
  if not parts:
    logging.info("pretokenized this process's share into %s", workdir)
    return {"splits": splits, "complete": False}
  splits = merge_splits(parts)
  meta = {
      "format": token_shards.RECORD_FORMAT, "version": token_shards.RECORD_VERSION,
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "tokenizer": {"workdir": storage.absolute(config.tokenizer.workdir), "step": int(tok.step),
                    "codebook_size": int(tok.config.model.codebook_size)},
      "input": {"data": input_cfg.data, "num_frames": int(input_cfg.num_frames),
                "resolution": int(input_cfg.resolution), "seed": int(config.seed)},
      "text": text_meta,
      "eval_from": eval_from if "eval" in splits else None,
      "splits": splits,
      "complete": True,
  }
  # Written last, whole: its presence says the folder is complete.
  storage.write_json(storage.join(workdir, token_shards.METADATA), meta)
  logging.info("pretokenized %s into %s", {k: v["records"] for k, v in splits.items()}, workdir)
  return meta
