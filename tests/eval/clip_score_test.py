"""CLIP score: the definition, frame averaging, batching, loading.

Random weights cannot tell a matching caption from another, so these tests
check the computation itself against a NumPy recomputation from the model's
own encoders. The checkpoint is a tiny random model exported in open_clip's
layout and the tokenizer a tiny merges file: neither torch nor open_clip is
needed.
"""
import functools
import gzip

import jax
import numpy as np
import pytest

from phenaki_jax.eval import clip_score
from phenaki_jax.pretrained import clip
from phenaki_jax.pretrained import clip_tokenizer
from phenaki_jax.pretrained import clip_weights
from tests.helpers import upload_folder

# A few real-looking merges: the vocabulary is 512 bytes + 6 merges + SOT/EOT.
MERGES = ['t h', 'th e</w>', 'r e', 'o x</w>', 'f ox</w>', 'a </w>']
TEXTS = ['the red fox', 'a sea at sunset', 'the the the', 'zoom']


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
  """(folder with clip.safetensors and the merges file, config).

  64-wide heads, so that load_clip infers the whole architecture.
  """
  pytest.importorskip('safetensors')
  folder = tmp_path_factory.mktemp('clip')
  with gzip.open(folder / clip_tokenizer.MERGES_FILENAME, 'wt') as f:
    f.write('#version: 0.2\n' + '\n'.join(MERGES) + '\n')
  vocab = 512 + len(MERGES) + 2
  config = clip.CLIPConfig(
      embed_dim=16, image_size=16, patch_size=8, vision_width=128,
      vision_layers=1, vision_heads=2, vision_mlp_dim=64, context_length=8,
      vocab_size=vocab, text_width=64, text_layers=1, text_heads=1,
      text_mlp_dim=64, quick_gelu=True)
  module = config.make_module()
  variables = jax.jit(module.init)(jax.random.key(0),
                          np.zeros((1, 16, 16, 3), np.float32),
                          np.zeros((1, 8), np.int32))
  params = jax.tree.map(np.asarray, clip.nn.unbox(variables)['params'])
  clip_weights.save_safetensors(params, config, folder / 'clip.safetensors')
  return folder, config


@pytest.fixture(scope='module')
def bundle(checkpoint):
  folder, _ = checkpoint
  # The merges file is found beside the weights.
  return clip_score.load_clip(folder / 'clip.safetensors')


def _assert_same(got, want):
  # clip_score is 100x the cosine: the same float32 noise, scaled.
  np.testing.assert_allclose(got['cosine'], want['cosine'], atol=1e-5)
  np.testing.assert_allclose(got['clip_score'], want['clip_score'], atol=1e-3)


def _videos(n=4, t=3, h=20, w=28, seed=0):
  rng = np.random.default_rng(seed)
  return rng.integers(0, 256, (n, t, h, w, 3), dtype=np.uint8)


def test_matches_numpy_recomputation(bundle, checkpoint):
  _, config = checkpoint
  assert bundle.config == config
  assert bundle.tokenizer.vocab_size == config.vocab_size
  videos = _videos()
  out = clip_score.clip_score(bundle, videos, TEXTS, batch_size=5)
  assert set(out) == {'clip_score', 'cosine'}
  assert out['clip_score'].shape == out['cosine'].shape == (4,)

  module = bundle.module
  variables = {'params': bundle.params}
  ids = bundle.tokenizer.encode_batch(TEXTS)
  encode_text = jax.jit(functools.partial(module.apply,
                                          method=clip.CLIP.encode_text))
  encode_image = jax.jit(functools.partial(module.apply,
                                           method=clip.CLIP.encode_image))
  text = np.asarray(encode_text(variables, ids))
  frames = clip.preprocess_frames(videos.reshape(12, 20, 28, 3), 16)
  image = np.asarray(encode_image(variables, frames))
  np.testing.assert_allclose(np.linalg.norm(image, axis=-1), 1.0, atol=1e-5)
  cos = np.einsum('nte,ne->nt', image.reshape(4, 3, -1), text)
  np.testing.assert_allclose(out['cosine'], cos.mean(1), atol=1e-5)
  np.testing.assert_allclose(out['clip_score'],
                             (100 * np.maximum(cos, 0)).mean(1), atol=1e-3)
  assert (out['clip_score'] >= 0).all() and (out['clip_score'] <= 100).all()


def test_frame_average(bundle):
  frames = _videos(n=2, t=1, seed=1)
  single = clip_score.clip_score(bundle, frames, TEXTS[:2])
  repeated = clip_score.clip_score(bundle, np.repeat(frames, 5, axis=1),
                                   TEXTS[:2])
  _assert_same(repeated, single)
  # A two-frame clip averages its frames' scores.
  pair = np.concatenate([frames[:1], frames[1:]], axis=1)
  both = clip_score.clip_score(bundle, pair, TEXTS[:1])
  each = clip_score.clip_score(bundle, frames, TEXTS[:1] * 2)
  np.testing.assert_allclose(both['cosine'], each['cosine'].mean(), atol=1e-5)


def test_batch_size_and_order_independent(bundle, tmp_path):
  videos = _videos(n=5, t=2, seed=2)
  texts = TEXTS + ['another caption']
  want = clip_score.clip_score(bundle, videos, texts, batch_size=64)
  for batch_size in (1, 3):
    got = clip_score.clip_score(bundle, videos, texts, batch_size=batch_size)
    _assert_same(got, want)
  # One compile per frame shape and batch size: the short last batch is
  # padded, not recompiled (5 * 2 frames in batches of 7 -> 7, 3).
  _assert_same(clip_score.clip_score(bundle, videos, texts, batch_size=7),
               want)
  assert bundle._on_mesh(7)[2]['frames']._cache_size() == 1

  perm = np.array([3, 0, 4, 1, 2])
  got = clip_score.clip_score(bundle, videos[perm], [texts[i] for i in perm],
                              batch_size=3)
  _assert_same(got, {k: v[perm] for k, v in want.items()})

  # A memory-mapped array streams through unchanged.
  mapped = np.lib.format.open_memmap(tmp_path / 'v.npy', mode='w+',
                                     dtype=np.uint8, shape=videos.shape)
  mapped[:] = videos
  got = clip_score.clip_score(bundle, mapped, texts, batch_size=3)
  np.testing.assert_allclose(got['cosine'], want['cosine'], atol=1e-5)


def test_input_errors(bundle, checkpoint):
  videos = _videos(n=2, t=2)
  with pytest.raises(TypeError, match='uint8'):
    clip_score.clip_score(bundle, videos.astype(np.float32), TEXTS[:2])
  with pytest.raises(ValueError, match='2 videos but 3 texts'):
    clip_score.clip_score(bundle, videos, TEXTS[:3])
  with pytest.raises(ValueError, match=r'\[N, T, H, W, 3\]'):
    clip_score.clip_score(bundle, videos[0], TEXTS[:2])
  with pytest.raises(TypeError, match='not a str'):
    clip_score.clip_score(bundle, videos[:1], 'a caption')
  folder, _ = checkpoint
  with pytest.raises(FileNotFoundError):
    clip_score.load_clip(folder / 'missing.safetensors')


def test_load_clip_from_a_bucket_is_the_local_model(bundle, checkpoint, bucket):
  folder, config = checkpoint
  remote = upload_folder(folder, f'{bucket}/clip')
  # Weights read tensor by tensor; the merges file found beside them there.
  got = clip_score.load_clip(f'{remote}/clip.safetensors')
  assert got.config == config and got.source == f'{remote}/clip.safetensors'
  jax.tree.map(np.testing.assert_array_equal, got.params, bundle.params)
  np.testing.assert_array_equal(got.tokenizer.encode_batch(TEXTS),
                                bundle.tokenizer.encode_batch(TEXTS))
  with pytest.raises(FileNotFoundError, match=f'{bucket}/clip/missing.safetensors'):
    clip_score.load_clip(f'{remote}/missing.safetensors')


def test_the_same_scores_on_meshes_of_8_and_1_devices(checkpoint):
  """Frames and captions split over a mesh: the scores do not depend on its size."""
  from phenaki_jax import placement
  folder, _ = checkpoint
  videos = _videos(n=4, t=2, seed=3)
  scores = []
  for n in (8, 1):
    mesh = placement.default_mesh(n, 'clip.batch_size')
    assert mesh.devices.size == n
    got = clip_score.load_clip(folder / 'clip.safetensors', mesh=mesh)
    assert all(x.sharding.is_fully_replicated and x.sharding.mesh == mesh
               for x in jax.tree.leaves(got.params))
    scores.append(clip_score.clip_score(got, videos, TEXTS, batch_size=8))
  np.testing.assert_allclose(scores[1]['cosine'], scores[0]['cosine'], rtol=1e-5, atol=1e-6)
  on_2 = clip_score.load_clip(folder / 'clip.safetensors',
                              mesh=placement.default_mesh(2, 'clip.batch_size'))
  with pytest.raises(ValueError, match=r'config.clip.batch_size=3: .* 2 ways'):
    clip_score.clip_score(on_2, videos, TEXTS, batch_size=3)
