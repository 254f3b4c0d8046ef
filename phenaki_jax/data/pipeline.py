"""grain input pipelines: sources -> per-process shard -> shuffle -> batch -> mix.

How images and videos share a step: every batch is *either* video clips
(B, T, H, W, 3) *or* images as 1-frame clips (B, 1, H, W, 3); grain mixes the
two batched streams at `video_ratio` as a deterministic interleave (for 0.8:
four video batches, one image batch, …). Batches of one kind have one static
shape, so the train step compiles twice (once per kind) and nothing is padded.
With equal batch sizes, the fraction of examples that are videos equals
`video_ratio` exactly. Every process builds the same interleave, so all
processes agree on the kind of every step.
"""
from __future__ import annotations

from typing import Any

import grain
import jax.numpy as jnp
import ml_collections
import numpy as np

from phenaki_jax import storage
from phenaki_jax.data import global_order, sources, synthetic, token_shards

# Eval clips come from a different seed of the same generator: same
# distribution, different examples.
EVAL_SEED_OFFSET = 1_000_003


def make_sources(input_cfg: ml_collections.ConfigDict, seed: int,
                 text_max_length: int = 0) -> tuple[Any, Any]:
  """(video source or None, image source or None), each a grain random-access source.

  `text_max_length` pads cached text embeddings of pre-tokenised data.
  """
  want_video = input_cfg.video_ratio > 0
  want_image = input_cfg.video_ratio < 1
  if input_cfg.data == "shapes":
    video = synthetic.ShapesVideoSource(num_frames=input_cfg.num_frames,
                                        resolution=input_cfg.resolution, seed=seed)
    image = synthetic.ShapesImageSource(resolution=input_cfg.resolution, seed=seed + 1)
  elif input_cfg.data == "shards":
    video = _shard_source(input_cfg.video_shards, "video", input_cfg) if want_video else None
    image = _shard_source(input_cfg.image_shards, "image", input_cfg) if want_image else None
  elif input_cfg.data == "tokens":
    # Codes written by configs/pretokenize.py; the trainer checks them against its tokenizer.
    video = (token_shards.TokenShardSource(input_cfg.token_shards, "video", text_max_length)
             if want_video else None)
    image = (token_shards.TokenShardSource(input_cfg.token_shards, "image", text_max_length)
             if want_image else None)
  elif input_cfg.data == "tfds":
    video = _tfds_source(input_cfg.tfds_video, "video", input_cfg) if want_video else None
    image = _tfds_source(input_cfg.tfds_image, "image", input_cfg) if want_image else None
  else:
    raise ValueError(f"config.input.data={input_cfg.data!r}: must be 'shapes', 'shards', 'tfds' "
                     "or (for the generator) 'tokens'")
  return (video if want_video else None), (image if want_image else None)


def _shard_source(paths: str, kind: str, input_cfg: ml_collections.ConfigDict) -> Any:
  """Prepared shards (a prepare output dir, a shard dir, a glob, or a comma list)."""
  spec = [p for p in paths.split(",") if p] if "," in paths else paths
  source = sources.ClipShardSource(spec, kind=kind)
  _check_clip_shape(source, kind, input_cfg, where=f"{kind} shards {source.paths[0]}")
  return source


def _tfds_source(name: str, kind: str, input_cfg: ml_collections.ConfigDict) -> Any:
  source = sources.TfdsClipSource(
      name, split=input_cfg.tfds_split, data_dir=input_cfg.tfds_data_dir or None,
      frames_key=input_cfg.tfds_frames_key, caption_key=input_cfg.tfds_caption_key)
  _check_clip_shape(source, kind, input_cfg, where=f"TFDS {kind} dataset {name}")
  return source


def _check_clip_shape(source: Any, kind: str, input_cfg: ml_collections.ConfigDict,
                      where: str) -> None:
  if len(source) == 0:
    raise ValueError(f"{where} holds no examples")
  frames = np.asarray(source[0]["frames"])
  want = ((input_cfg.num_frames if kind == "video" else 1), input_cfg.resolution,
          input_cfg.resolution, 3)
  if frames.shape != want:
    raise ValueError(
        f"{where} holds clips of shape {frames.shape}, but the config asks for {want} "
        "(config.input.num_frames / config.input.resolution): prepare the data again with "
        "matching num_frames and resolution")


class SelectFrames(grain.transforms.Map):
  """Keeps the uint8 frames (or pre-tokenised codes), and the caption when asked.

  The tokenizer needs no captions (dropping them keeps its batches pure
  arrays); the generator keeps them and tokenises them on the host, unless
  the records carry cached text embeddings.
  """

  def __init__(self, keep_caption: bool = False):
    self.keep_caption = keep_caption

  def map(self, element: dict) -> dict:
    if "codes" in element:  # pre-tokenised: codes, and cached embeddings when present
      out = {k: element[k] for k in ("codes", "text_embeddings", "text_mask") if k in element}
    else:
      out = {"frames": np.asarray(element["frames"], np.uint8)}
    if self.keep_caption and "text_embeddings" not in element:
      out["caption"] = str(element["caption"])
    if "prefix_frames" in element:  # a story clip: its context length
      out["prefix_frames"] = np.int32(element["prefix_frames"])
    if "memory_frames" in element:  # and its object seen apart (long-term memory)
      out["memory_frames"] = np.asarray(element["memory_frames"], np.uint8)
    return out


class ClipAugment(grain.transforms.RandomMap):
  """Random crop (resized back) and horizontal flip, identical for all frames.

  One draw per clip: a crop that moved between frames would add motion the
  video does not have.
  """

  def __init__(self, min_scale: float, flip: bool):
    self.min_scale = min_scale
    self.flip = flip

  def random_map(self, element: dict, rng: np.random.Generator) -> dict:
    if "memory_frames" in element:  # the clip's memory: the same crop and flip
      n = len(element["memory_frames"])
      both = self.random_map({"frames": np.concatenate([element["memory_frames"],
                                                        element["frames"]])}, rng)["frames"]
      return {**element, "memory_frames": both[:n], "frames": both[n:]}
    frames = element["frames"]
    _, h, w, _ = frames.shape
    if self.min_scale < 1.0:
      scale = rng.uniform(self.min_scale, 1.0)
      ch, cw = max(1, int(round(h * scale))), max(1, int(round(w * scale)))
      y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
      frames = resize_frames(frames[:, y:y + ch, x:x + cw], h, w)
    if self.flip and rng.random() < 0.5:
      frames = frames[:, :, ::-1]
    return {**element, "frames": np.ascontiguousarray(frames)}


def resize_frames(frames: np.ndarray, height: int, width: int) -> np.ndarray:
  """uint8 (T, h, w, C) -> (T, height, width, C), bilinear with antialiasing."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  if frames.shape[1:3] == (height, width):
    return frames
  return np.stack([np.asarray(Image.fromarray(f).resize((width, height), Image.BILINEAR))
                   for f in frames])


def _batched_stream(source: Any, *, batch_size: int, seed: int, process_index: int,
                    process_count: int, input_cfg: ml_collections.ConfigDict,
                    keep_caption: bool = False) -> grain.MapDataset:
  # One shuffled, augmented stream on every process; each takes its rows of
  # every global batch (global_order.py): the order does not depend on the process count.
  ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat()
  ds = ds.map(SelectFrames(keep_caption))
  if input_cfg.random_crop_min_scale < 1.0 or input_cfg.horizontal_flip:
    # Seeded per (seed, index): a resumed run augments exactly as before.
    ds = ds.random_map(ClipAugment(input_cfg.random_crop_min_scale, input_cfg.horizontal_flip),
                       seed=seed + 1)
  return global_order.local_batches(ds, global_batch=batch_size, process_index=process_index,
                                    process_count=process_count)


def make_train_dataset(input_cfg: ml_collections.ConfigDict, *, seed: int, process_index: int = 0,
                       process_count: int = 1, keep_caption: bool = False,
                       text_max_length: int = 0,
                       story_memory_frames: int = 0) -> grain.IterDataset:
  """The infinite, checkpointable stream of this process's local batches.

  Batches are {"frames": uint8 (B, T, H, W, 3)}, plus {"caption": str (B,)}
  with `keep_caption`; pre-tokenised data gives {"codes": int32 (B, t, h, w)}
  and cached {"text_embeddings", "text_mask"} in place of captions. Story
  batches add "prefix_frames" (B,), and with `story_memory_frames` > 0
  "memory_frames" uint8 (B, story_memory_frames, H, W, 3), each clip's
  object rendered apart from it (the generator's long-term memory).
  """
  if input_cfg.batch_size % process_count:
    raise ValueError(f"config.input.batch_size={input_cfg.batch_size} must be divisible by "
                     f"the {process_count} processes")
  video, image = make_sources(input_cfg, seed, text_max_length)
  story_ratio = input_cfg.get("story_ratio", 0.0)
  story = None
  if input_cfg.data != "shapes":
    story_ratio = 0.0  # stories are rendered from the built-in data only
  if story_ratio > 0 and input_cfg.video_ratio > 0:
    # The generator's story task (built-in data): a share of the video batches.
    story = synthetic.ShapesStorySource(input_cfg.num_frames, input_cfg.resolution,
                                        input_cfg.story_context_frames, seed=seed + 2,
                                        memory_frames=story_memory_frames)
  streams, weights = [], []
  for i, (source, weight) in enumerate((
      (video, input_cfg.video_ratio * (1.0 - story_ratio)),
      (image, 1.0 - input_cfg.video_ratio),
      (story, input_cfg.video_ratio * story_ratio))):
    if source is not None and weight > 0:
      streams.append(_batched_stream(source, batch_size=input_cfg.batch_size, seed=seed + 7919 * i,
                                     process_index=process_index, process_count=process_count,
                                     input_cfg=input_cfg, keep_caption=keep_caption))
      weights.append(weight)
  ds = streams[0] if len(streams) == 1 else grain.MapDataset.mix(streams, weights=weights)
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=input_cfg.prefetch))
  if input_cfg.num_workers > 0:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=input_cfg.num_workers))
  return it


# --- Evaluation clips: held out when the data has a held-out part, and said so when not.

def eval_source(input_cfg: ml_collections.ConfigDict,
                trained: ml_collections.ConfigDict | None = None) -> tuple[str, bool]:
  """(description, held_out) of the clips `eval_videos` / `eval_clips` read.

  The description starts 'held out: ' or 'training clips: ' and says where
  the clips come from; logs and reports carry it as it is. Held out: the
  built-in data's eval seed stream (other samples of the same generator),
  the eval split configs/prepare.py wrote beside the training shards (or
  input.eval_shards), a TFDS input.tfds_eval_split, or token shards with an
  'eval' split. Anything else is the training data.

  Args:
    trained: for an evaluation job, the input config the model trained on:
      other shards (by path) or another TFDS dataset or split than those are
      held out as a whole; the same ones are read as a trainer reads them.
  """
  description, held_out, _ = _eval_plan(input_cfg, trained)
  return description, held_out


def _other_data(input_cfg: ml_collections.ConfigDict, trained: ml_collections.ConfigDict) -> bool:
  if input_cfg.data != trained.data:
    return True
  if input_cfg.data == "shards":
    return input_cfg.video_shards != trained.video_shards
  if input_cfg.data == "tfds":
    return (input_cfg.tfds_video, input_cfg.tfds_split) != (trained.tfds_video,
                                                             trained.tfds_split)
  return False


def _eval_plan(input_cfg: ml_collections.ConfigDict,
               trained: ml_collections.ConfigDict | None = None) -> tuple[str, bool, Any]:
  """(description, held_out, what to read: shard paths or a TFDS split)."""
  data = input_cfg.data
  if trained is not None and data in ("shards", "tfds") and _other_data(input_cfg, trained):
    if data == "shards":
      return (f"held out: other shards ({input_cfg.video_shards}) than the model trained on "
              "(by path)", True, _split_spec(input_cfg.video_shards))
    return (f"held out: another TFDS dataset or split ({input_cfg.tfds_video}, "
            f"{input_cfg.tfds_split!r}) than the model trained on", True, input_cfg.tfds_split)
  if data == "shapes":
    return (f"held out: built-in shapes from the eval seed stream (seed + {EVAL_SEED_OFFSET}), "
            "not the training stream", True, None)
  if data == "shards":
    return _eval_shards_plan(input_cfg)
  if data == "tfds":
    split = input_cfg.get("tfds_eval_split", "")
    if split and split != input_cfg.tfds_split:
      return (f"held out: split {split!r} of TFDS {input_cfg.tfds_video} "
              "(input.tfds_eval_split)", True, split)
    return (f"training clips: the training split {input_cfg.tfds_split!r} of TFDS "
            f"{input_cfg.tfds_video} (set input.tfds_eval_split to a held-out split)", False,
            input_cfg.tfds_split)
  if data == "tokens":
    where = input_cfg.token_shards
    if storage.isdir(storage.join(where, "eval")):
      made_from = ""
      if storage.exists(storage.join(where, token_shards.METADATA)):
        made_from = storage.read_json(storage.join(where, token_shards.METADATA)).get("eval_from")
      made_from = f" (encoded from {made_from.removeprefix('held out: ')})" if made_from else ""
      return f"held out: the 'eval' split of the token shards {where}{made_from}", True, None
    return (f"training clips: the token shards {where} have no 'eval' split (configs/"
            "pretokenize.py writes one from held-out clips)", False, None)
  raise ValueError(f"config.input.data={data!r}: must be 'shapes', 'shards', 'tfds' or 'tokens'")


def _split_spec(paths: str) -> Any:
  return [p for p in paths.split(",") if p] if "," in paths else paths


def _eval_shards_plan(input_cfg: ml_collections.ConfigDict) -> tuple[str, bool, Any]:
  given = input_cfg.get("eval_shards", "")
  if given:
    if "," not in given and sources.is_prepared_dir(given):
      found = sources.find_prepared_shards(given, "eval")["video"]
      if not found:
        raise ValueError(
            f"config.input.eval_shards={given!r}: this prepare output folder has no eval "
            "split (prepared with eval_fraction=0, before the split existed, or no video fell "
            "in it); give a folder with one, or shards of held-out videos")
      return f"held out: the eval split of {given} (input.eval_shards)", True, found
    if not storage.exists(given) and "," not in given and not any(c in given for c in "*?["):
      raise ValueError(f"config.input.eval_shards={given!r}: no such file or folder")
    return f"held out: input.eval_shards={given}", True, _split_spec(given)
  train = input_cfg.video_shards
  if "," not in train and sources.is_prepared_dir(train):
    found = sources.find_prepared_shards(train, "eval")["video"]
    if found:
      return (f"held out: the eval split of {train} (configs/prepare.py eval_fraction, by "
              "source file: no video has clips in both splits)", True, found)
    why = (f"{train} has no eval split with video clips (prepare it with eval_fraction > 0, "
           "or set input.eval_shards)")
  else:
    why = ("input.video_shards is not a prepare output folder, so it has no eval split "
           "beside it (set input.eval_shards)")
  return f"training clips: the training shards {train}; {why}", False, _split_spec(train)


def make_eval_source(input_cfg: ml_collections.ConfigDict, seed: int,
                     trained: ml_collections.ConfigDict | None = None) -> Any:
  """The random-access source of evaluation video clips (see `eval_source`)."""
  _, _, what = _eval_plan(input_cfg, trained)
  if input_cfg.data == "shards":
    source = sources.ClipShardSource(what, kind="video")
    _check_clip_shape(source, "video", input_cfg, where=f"eval shards {source.paths[0]}")
    return source
  cfg = _with_video_ratio(input_cfg, 1.0)
  if input_cfg.data == "tfds":
    cfg.tfds_split = what
  video, _ = make_sources(cfg, seed + EVAL_SEED_OFFSET)
  return video


def eval_indices(input_cfg: ml_collections.ConfigDict, source: Any, count: int) -> list[int]:
  """Which `count` clips of the eval source are read (source: `make_eval_source`'s)."""
  if input_cfg.data == "shapes":
    return list(range(count))  # an endless stream: its first clips
  # Evenly spaced over the split: neighbouring clips are mostly cut from one video.
  return [i * len(source) // count for i in range(count)]


def _eval_indices(input_cfg: ml_collections.ConfigDict, source: Any, count: int,
                  key: str, trained: ml_collections.ConfigDict | None) -> list[int]:
  if input_cfg.data != "shapes" and len(source) < count:
    raise ValueError(f"{key}={count}: the evaluation clips "
                     f"({eval_source(input_cfg, trained)[0]}) number only {len(source)}")
  return eval_indices(input_cfg, source, count)


def eval_videos(input_cfg: ml_collections.ConfigDict, *, seed: int, count: int,
                key: str = "count", trained: ml_collections.ConfigDict | None = None
                ) -> np.ndarray:
  """A fixed set of evaluation clips, uint8 (count, T, H, W, 3); `eval_source` says which.

  `key` names the config key of `count` in the error when there are fewer;
  `trained` as for `eval_source`.
  """
  video = make_eval_source(input_cfg, seed, trained)
  return np.stack([np.asarray(video[i]["frames"], np.uint8)
                   for i in _eval_indices(input_cfg, video, count, key, trained)])


def eval_clips(input_cfg: ml_collections.ConfigDict, *, seed: int, count: int,
               key: str = "count", trained: ml_collections.ConfigDict | None = None
               ) -> tuple[np.ndarray, list[str]]:
  """The clips of `eval_videos` with their captions."""
  video = make_eval_source(input_cfg, seed, trained)
  examples = [video[i] for i in _eval_indices(input_cfg, video, count, key, trained)]
  return (np.stack([np.asarray(e["frames"], np.uint8) for e in examples]),
          [str(e["caption"]) for e in examples])


def _with_video_ratio(input_cfg: ml_collections.ConfigDict, ratio: float) -> ml_collections.ConfigDict:
  cfg = ml_collections.ConfigDict(input_cfg.to_dict())
  cfg.video_ratio = ratio
  return cfg


def to_model_input(frames: Any) -> Any:
  """uint8 [0, 255] -> float32 [-1, 1]; done on device inside the step."""
  return jnp.asarray(frames, jnp.float32) / 127.5 - 1.0
