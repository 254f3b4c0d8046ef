"""CLIP score of generated videos against their prompts.

For clip i with frames f_1..f_T and caption c_i, each frame is embedded by
the CLIP image tower (OpenAI preprocessing: bicubic resize of the shortest
side, centre crop, mean/std normalisation) and the caption by the text tower;
with cos_t the cosine similarity of frame t and the caption:

  cosine[i]     = mean_t cos_t                       (raw, in [-1, 1])
  clip_score[i] = mean_t 100 * max(cos_t, 0)          (in [0, 100])

The 100 * max(cos, 0) scale is torchmetrics' `CLIPScore` (the CLIPScore paper,
Hessel et al. 2021, writes w * max(cos, 0) with w = 2.5; 100 is the scale
text-to-video papers report as CLIPSIM), applied per frame and averaged over
the frames, so a video of T identical frames scores exactly as its frame.
Scores depend on the CLIP model: report which one (`CLIPBundle.source`).

Frames stream through one jitted preprocess+encode function in fixed-size
batches (the last one padded), so device memory is bounded by `batch_size`
frames whatever the number of clips, and it compiles once per frame size.
Each batch is split over a mesh with devices of every process and the
embeddings come back replicated (`CLIPBundle`), so the scores do not depend
on the process count.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from phenaki_jax import distributed, storage
from phenaki_jax import placement as placement_lib
from phenaki_jax.pretrained import clip
from phenaki_jax.pretrained import clip_tokenizer
from phenaki_jax.pretrained import clip_weights

SCALE = 100.0


@dataclasses.dataclass
class CLIPBundle:
  """A loaded CLIP: module, params, tokenizer and jitted encoders.

  Each batch of frames (or captions) is one global array split over the
  batch axis of `mesh` (a mesh with devices of every process), the params
  are replicated on it and the embeddings come back replicated, so every
  process scores the same (phenaki_jax/placement.py). Without a mesh, each batch
  size gets placement.default_mesh; with one, batch sizes must divide over
  its batch ways. Every process must pass the same frames and captions.
  """
  module: clip.CLIP
  params: Any
  tokenizer: clip_tokenizer.CLIPTokenizer
  config: clip.CLIPConfig
  source: str = '<params>'
  mesh: Optional[Mesh] = None

  def __post_init__(self):
    module, size = self.module, self.config.image_size

    def frames_fn(params, frames):
      images = clip.preprocess_frames(frames, size)
      return module.apply({'params': params}, images,
                          method=clip.CLIP.encode_image)

    def text_fn(params, ids):
      return module.apply({'params': params}, ids,
                          method=clip.CLIP.encode_text)

    self._raw = {'frames': frames_fn, 'text': text_fn}
    if self.mesh is not None:
      # Replicated on the mesh now (every process loaded the same values).
      self.params = placement_lib.Placement(self.mesh).put_replicated(self.params)
    # One (placement, replicated params, jitted encoders) per mesh.
    self._placed: dict[Mesh, tuple[placement_lib.Placement, Any, dict[str, Any]]] = {}

  def _on_mesh(self, batch_size: int):
    if batch_size < 1:
      raise ValueError(f'batch_size must be >= 1, got {batch_size}')
    mesh = (self.mesh if self.mesh is not None
            else placement_lib.default_mesh(batch_size, 'clip.batch_size'))
    if mesh not in self._placed:
      pl = placement_lib.Placement(mesh)
      fns = {k: distributed.CompiledTogether(
          jax.jit(f, in_shardings=(pl.replicated, pl.batch), out_shardings=pl.replicated),
          f"clip_{k}") for k, f in self._raw.items()}
      self._placed[mesh] = (pl, pl.put_replicated(self.params), fns)
    pl, params, fns = self._placed[mesh]
    pl.check_batch(batch_size, 'clip.batch_size')
    return pl, params, fns

  def encode_frames(self, frames: np.ndarray, batch_size: int = 64
                    ) -> np.ndarray:
    """uint8 frames (M, H, W, 3) -> L2-normalised embeddings (M, E) float32."""
    return _batched(self._on_mesh(batch_size), 'frames', frames, batch_size)

  def encode_texts(self, texts: Sequence[str], batch_size: int = 64
                   ) -> np.ndarray:
    """Captions -> L2-normalised embeddings (len(texts), E) float32."""
    ids = self.tokenizer.encode_batch(list(texts), self.config.context_length)
    return _batched(self._on_mesh(batch_size), 'text', ids, batch_size)


def _batched(on_mesh, which: str, inputs: np.ndarray, batch_size: int) -> np.ndarray:
  """Runs encoder `which` over rows of `inputs` in fixed-size (zero-padded) batches."""
  pl, params, fns = on_mesh
  n = inputs.shape[0]
  outputs = []
  for start in range(0, n, batch_size):
    chunk = np.asarray(inputs[start:start + batch_size])
    real = chunk.shape[0]
    if real < batch_size:
      # One shape for every call: a short last batch would compile again.
      pad = np.zeros((batch_size - real,) + chunk.shape[1:], chunk.dtype)
      chunk = np.concatenate([chunk, pad])
    # Under our mesh: the caller may be inside another (a sampling generator's).
    with jax.set_mesh(pl.mesh):
      out = fns[which](params, pl.put_batch(chunk))
    outputs.append(placement_lib.to_host(out)[:real])
  if not outputs:
    return np.zeros((0, 0), np.float32)
  return np.concatenate(outputs).astype(np.float32)


def _merges_near(path: str) -> Optional[str]:
  folder = path if storage.isdir(path) else storage.dirname(path)
  candidate = storage.join(folder, clip_tokenizer.MERGES_FILENAME)
  return candidate if storage.exists(candidate) else None


def load_clip(path: str | os.PathLike[str],
              merges_path: Optional[str | os.PathLike[str]] = None,
              quick_gelu: Optional[bool] = None,
              dtype: Any = jnp.float32,
              config: Optional[clip.CLIPConfig] = None,
              mesh: Optional[Mesh] = None) -> CLIPBundle:
  """Loads a ViT CLIP checkpoint and its BPE tokenizer.

  Args:
    path: weights in open_clip / OpenAI naming: .safetensors, torch .pt/.bin
      (state dict or OpenAI TorchScript archive; needs torch), or an open_clip
      folder. See `clip_weights.load_clip_params`.
    merges_path: `bpe_simple_vocab_16e6.txt.gz`. Default: the file beside the
      checkpoint, else the one in an installed open_clip package.
    quick_gelu: MLP activation; None reads open_clip_config.json beside the
      weights, else assumes OpenAI's QuickGELU.
    dtype: compute dtype (parameters stay float32; embeddings are float32).
    config: the architecture, only for checkpoints whose heads are not
      64 wide (it is otherwise inferred from the shapes).
    mesh: where scoring runs (see `CLIPBundle`); the params are replicated
      on it.

  Returns:
    A `CLIPBundle` for `clip_score`.
  """
  path = os.fspath(path)
  params, config = clip_weights.load_clip_params(path, config=config,
                                                 quick_gelu=quick_gelu)
  if merges_path is None:
    merges_path = _merges_near(path)
  tokenizer = clip_tokenizer.CLIPTokenizer(
      merges_path, context_length=config.context_length)
  if tokenizer.vocab_size > config.vocab_size:
    raise ValueError(f'CLIP checkpoint {path}: the tokenizer emits '
                     f'{tokenizer.vocab_size} ids but the token embedding has '
                     f'{config.vocab_size} rows')
  return CLIPBundle(module=config.make_module(dtype=dtype), params=params,
                    tokenizer=tokenizer, config=config, source=path, mesh=mesh)


def clip_score(bundle: CLIPBundle, videos: np.ndarray, texts: Sequence[str],
               batch_size: int = 64) -> dict[str, np.ndarray]:
  """Frame-averaged CLIP score of each clip against its caption.

  Args:
    bundle: from `load_clip`.
    videos: uint8 RGB [N, T, H, W, 3] (any H, W: frames are resized and
      centre-cropped as CLIP's preprocessing does). A numpy memmap works:
      only `batch_size` frames are read at a time.
    texts: N captions, texts[i] for videos[i].
    batch_size: frames (and captions) per device call.

  Returns:
    {'clip_score': float32 [N], mean over frames of 100 * max(cos, 0);
     'cosine': float32 [N], mean over frames of the raw cosine}.
  """
  if isinstance(texts, str):
    raise TypeError('texts must be a sequence of strings, not a str')
  texts = list(texts)
  if getattr(videos, 'ndim', None) != 5 or videos.shape[-1] != 3:
    raise ValueError(f'videos must be [N, T, H, W, 3], got shape '
                     f'{getattr(videos, "shape", None)}')
  if videos.dtype != np.uint8:
    raise TypeError(f'videos must be uint8 RGB in [0, 255], got '
                    f'{videos.dtype}')
  n, t = videos.shape[:2]
  if len(texts) != n:
    raise ValueError(f'{n} videos but {len(texts)} texts')
  if n == 0 or t == 0:
    raise ValueError(f'no frames to score (videos shape {videos.shape})')

  text_emb = bundle.encode_texts(texts, batch_size)               # (N, E)
  frames = videos.reshape((n * t,) + videos.shape[2:])            # a view
  frame_emb = bundle.encode_frames(frames, batch_size).reshape(n, t, -1)
  cos = np.einsum('nte,ne->nt', frame_emb.astype(np.float64),
                  text_emb.astype(np.float64))
  return {
      'clip_score': (SCALE * np.maximum(cos, 0.0)).mean(axis=1).astype(
          np.float32),
      'cosine': cos.mean(axis=1).astype(np.float32),
  }
