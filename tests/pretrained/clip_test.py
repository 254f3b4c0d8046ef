"""CLIP: numerics vs open_clip, weight loaders, tokenizer, preprocessing.

The reference is `open_clip.CLIP` (open_clip_torch 3.2.0, torch CPU) built
with random weights: nothing is downloaded. Parity tests skip when torch or
open_clip is not installed.
"""
import gzip
import importlib.util
import json
import sys
import types
import zipfile

import flax.linen as nn
import jax
import numpy as np
import pytest

from phenaki_jax.pretrained import clip
from phenaki_jax.pretrained import clip_tokenizer
from phenaki_jax.pretrained import clip_weights

# A tiny ViT CLIP; 16-wide heads, so the configs are passed explicitly (the
# loader's inference assumes 64-wide heads, tested separately).
VISION = dict(image_size=32, patch_size=8, width=48, layers=2, head_width=16)
TEXT = dict(context_length=12, vocab_size=100, width=32, heads=4, layers=2)
EMBED = 16


def _config(quick_gelu=True, **overrides):
  return clip.CLIPConfig(**{**dict(
      embed_dim=EMBED, image_size=32, patch_size=8, vision_width=48,
      vision_layers=2, vision_heads=3, vision_mlp_dim=192, context_length=12,
      vocab_size=100, text_width=32, text_layers=2, text_heads=4,
      text_mlp_dim=128, quick_gelu=quick_gelu), **overrides})


_TORCHVISION_NAMES = ('torchvision', 'torchvision.ops', 'torchvision.ops.misc',
                      'torchvision.transforms',
                      'torchvision.transforms.functional')


def import_open_clip():
  """open_clip, importable without a working torchvision.

  open_clip imports torchvision at package import (for its image transforms
  and FrozenBatchNorm2d), but its CLIP model never uses it. PyPI's
  torchvision wheels are CUDA builds that fail to load against the CPU torch
  of the test extra (and, once installed, break `import transformers`), so
  open_clip is installed with --no-deps and, when torchvision cannot be
  imported, gets a placeholder for the duration of its own import only.
  """
  torch = pytest.importorskip('torch')
  if importlib.util.find_spec('open_clip') is None:
    pytest.skip('open_clip_torch is not installed')
  if 'open_clip' in sys.modules:
    return sys.modules['open_clip'], torch
  if importlib.util.find_spec('transformers') is not None:
    # transformers decides once, at import, whether torchvision exists: let
    # it decide before the placeholder is in place.
    importlib.import_module('transformers')
  try:
    import open_clip  # pylint: disable=g-import-not-at-top
    return open_clip, torch
  except (ImportError, RuntimeError):
    for name in list(sys.modules):
      if name.split('.')[0] in ('torchvision', 'open_clip'):
        del sys.modules[name]

  class _AnyMeta(type):

    def __getattr__(cls, name):
      return cls

  class _Any(metaclass=_AnyMeta):

    def __init__(self, *args, **kwargs):
      pass

  stubs = {}
  for name in _TORCHVISION_NAMES:
    module = types.ModuleType(name)
    module.__getattr__ = lambda attr: _Any
    stubs[name] = module
  for name, module in stubs.items():
    if '.' in name:
      parent, child = name.rsplit('.', 1)
      setattr(stubs[parent], child, module)
  sys.modules.update(stubs)
  try:
    import open_clip  # pylint: disable=g-import-not-at-top
  finally:
    for name in _TORCHVISION_NAMES:
      sys.modules.pop(name, None)
  return open_clip, torch


def _open_clip_model(quick_gelu=True, vision=None, text=None, seed=0):
  """A random open_clip CLIP whose norms, biases and scale are non-trivial."""
  open_clip, torch = import_open_clip()
  torch.manual_seed(seed)
  model = open_clip.CLIP(embed_dim=EMBED, vision_cfg=dict(vision or VISION),
                         text_cfg=dict(text or TEXT),
                         quick_gelu=quick_gelu).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name == 'logit_scale':
        p.fill_(2.3)
      elif p.ndim == 1 and 'ln' in name and name.endswith('weight'):
        # open_clip starts norms at 1 and biases at 0, where a swapped or
        # transposed mapping would not show.
        p.uniform_(0.5, 1.5)
      elif p.ndim == 1:
        p.normal_(0.0, 0.1)
  return model


def _state_dict(model):
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _inputs(config, batch=3, seed=0):
  """Normalised-range images and ids ending in EOT (the largest id)."""
  rng = np.random.default_rng(seed)
  images = rng.normal(size=(batch, config.image_size, config.image_size, 3)
                      ).astype(np.float32)
  eot = config.vocab_size - 1
  ids = np.zeros((batch, config.context_length), np.int64)
  for row, n in enumerate([config.context_length, 5, 2][:batch]):
    ids[row, 0] = eot - 1  # stands in for SOT
    ids[row, 1:n - 1] = rng.integers(1, eot - 1, n - 2)
    ids[row, n - 1] = eot
  return images, ids


def _reference(model, images, ids):
  _, torch = import_open_clip()
  with torch.no_grad():
    img, txt, scale = model(torch.from_numpy(images.transpose(0, 3, 1, 2)),
                            torch.from_numpy(ids))
    return img.numpy(), txt.numpy(), (scale * img @ txt.T).numpy()


def _ours(params, config, images, ids):
  module = config.make_module()
  img, txt, scale = jax.jit(module.apply)({'params': params}, images, ids)
  return (np.asarray(img), np.asarray(txt),
          np.asarray(clip.logits(img, txt, scale)))


def _assert_parity(model, params, config, atol=1e-4):
  images, ids = _inputs(config)
  ref = _reference(model, images, ids)
  got = _ours(params, config, images, ids)
  for name, a, b in zip(('image', 'text', 'logits'), got, ref):
    # Logits are exp(2.3) ~ 10x the cosines: compare relative to that scale.
    scale = np.abs(b).max() if name == 'logits' else 1.0
    assert np.abs(a - b).max() < atol * scale, (name, np.abs(a - b).max())


# ---------------------------------------------------------------------------
# Parity with open_clip
# ---------------------------------------------------------------------------


@pytest.mark.parametrize('quick_gelu', [True, False])
@pytest.mark.parametrize('fmt', ['pt', 'safetensors'])
def test_checkpoint_parity(tmp_path, fmt, quick_gelu):
  model = _open_clip_model(quick_gelu)
  _, torch = import_open_clip()
  if fmt == 'pt':
    path = tmp_path / 'clip.pt'
    torch.save(model.state_dict(), path)
  else:
    safetensors_torch = pytest.importorskip('safetensors.torch')
    path = tmp_path / 'clip.safetensors'
    safetensors_torch.save_file(model.state_dict(), str(path))
  config = _config(quick_gelu)
  params, got = clip_weights.load_clip_params(path, config=config)
  assert got == config
  _assert_parity(model, params, config)


# Tracing open_clip's attention warns about shape checks it freezes.
@pytest.mark.filterwarnings('ignore:Converting a tensor')
def test_torchscript_archive_and_training_checkpoint(tmp_path):
  """OpenAI's released files are TorchScript; open_clip saves {'state_dict'}."""
  model = _open_clip_model()
  _, torch = import_open_clip()
  config = _config()
  images, ids = _inputs(config)
  traced = torch.jit.trace(model, (torch.from_numpy(images.transpose(
      0, 3, 1, 2)), torch.from_numpy(ids)))
  path = tmp_path / 'ViT-tiny.pt'
  traced.save(str(path))
  params, _ = clip_weights.load_clip_params(path, config=config)
  _assert_parity(model, params, config)

  path = tmp_path / 'epoch_3.pt'
  torch.save({'epoch': 3, 'name': 'tiny', 'state_dict': {
      f'module.{k}': v for k, v in model.state_dict().items()}}, path)
  params, _ = clip_weights.load_clip_params(path, config=config)
  _assert_parity(model, params, config)


def test_architecture_inferred_from_shapes(tmp_path):
  vision = dict(image_size=24, patch_size=6, width=128, layers=1,
                head_width=64, mlp_ratio=2.0)
  text = dict(context_length=10, vocab_size=90, width=64, heads=1, layers=3)
  model = _open_clip_model(vision=vision, text=text)
  _, torch = import_open_clip()
  # OpenAI's number keys ride along in its archives.
  state = dict(model.state_dict())
  state.update(input_resolution=torch.tensor(24), context_length=torch.tensor(
      10), vocab_size=torch.tensor(90))
  torch.save(state, tmp_path / 'clip.bin')
  params, config = clip_weights.load_clip_params(tmp_path / 'clip.bin')
  assert config == clip.CLIPConfig(
      embed_dim=EMBED, image_size=24, patch_size=6, vision_width=128,
      vision_layers=1, vision_heads=2, vision_mlp_dim=256, context_length=10,
      vocab_size=90, text_width=64, text_layers=3, text_heads=1,
      text_mlp_dim=256, quick_gelu=True)
  _assert_parity(model, params, config)

  # An open_clip folder: weights + open_clip_config.json (GELU by default).
  folder = tmp_path / 'hf'
  folder.mkdir()
  safetensors_torch = pytest.importorskip('safetensors.torch')
  safetensors_torch.save_file(model.state_dict(),
                              str(folder / 'open_clip_model.safetensors'))
  (folder / 'open_clip_config.json').write_text(json.dumps(
      {'model_cfg': {'embed_dim': EMBED}}))
  _, config = clip_weights.load_clip_params(folder)
  assert not config.quick_gelu


def test_state_dict_round_trip_and_param_tree():
  state = _state_dict(_open_clip_model())
  config = _config()
  params, _ = clip_weights.state_dict_to_params(state, config)
  back = clip_weights.params_to_state_dict(params, config)
  assert set(back) == set(state)
  for k, v in back.items():
    np.testing.assert_array_equal(v, state[k], err_msg=k)

  module = config.make_module()
  images, ids = _inputs(config)
  variables = jax.jit(module.init)(jax.random.key(0), images, ids)
  assert jax.tree.map(np.shape, nn.unbox(variables)['params']) == \
      jax.tree.map(np.shape, params)
  axes = nn.get_partition_spec(variables)['params']
  block = axes['visual']['transformer']['resblocks_0']
  assert tuple(block['attn']['query']['kernel']) == ('embed', 'heads', 'kv')
  assert tuple(block['attn']['out']['kernel']) == ('heads', 'kv', 'embed')
  assert tuple(block['mlp']['c_fc']['kernel']) == ('embed', 'mlp')
  assert tuple(axes['text']['token_embedding']) == ('vocab', 'embed')


def test_sharded_numerics():
  config = _config()
  module = config.make_module()
  images, ids = _inputs(config)
  images = np.concatenate([images, images[:1]] * 2)[:8]
  ids = np.concatenate([ids, ids[:1]] * 2)[:8]
  params = nn.unbox(jax.jit(module.init)(jax.random.key(0), images, ids))
  want = jax.jit(module.apply)(params, images, ids)
  mesh = jax.make_mesh((2, 2, 2), ('data', 'fsdp', 'tensor'),
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  rules = (('act_batch', ('data', 'fsdp')), ('act_heads', 'tensor'),
           ('act_mlp', 'tensor'), ('act_len', None), ('act_embed', None))
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    fn = jax.jit(module.apply)
    assert 'sharding_constraint' in fn.lower(params, images, ids).as_text()
    got = fn(params, images, ids)
  for a, b in zip(got, want):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


def _random_state(config, seed=0):
  module = config.make_module()
  images, ids = _inputs(config)
  variables = jax.jit(module.init)(jax.random.key(seed), images, ids)
  params = nn.unbox(variables)['params']
  return clip_weights.params_to_state_dict(params, config)


def test_errors_name_each_bad_key_and_the_file(tmp_path):
  config = _config()
  state = _random_state(config)
  del state['transformer.resblocks.1.mlp.c_proj.bias']
  state['visual.transformer.resblocks.0.ln_1.weight'] = np.ones(47,
                                                                np.float32)
  state['logit_bias'] = np.zeros((), np.float32)
  state['attn_mask'] = np.zeros((12, 12), np.float32)  # ignored buffer
  path = tmp_path / 'bad.safetensors'
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  save_file(state, str(path))
  with pytest.raises(ValueError) as err:
    clip_weights.load_clip_params(path, config=config)
  msg = str(err.value)
  assert msg.startswith(f'CLIP checkpoint {path}: ')
  assert 'missing transformer.resblocks.1.mlp.c_proj.bias' in msg
  assert 'unexpected logit_bias' in msg
  assert ('shape mismatch visual.transformer.resblocks.0.ln_1.weight: '
          'checkpoint (47,) vs model (48,)') in msg
  assert 'attn_mask' not in msg


def test_other_errors(tmp_path):
  config = _config()
  state = _random_state(config)
  with pytest.raises(ValueError, match="metadata mismatch context_length: "
                     "checkpoint 77 vs weights 12"):
    clip_weights.state_dict_to_params({**state, 'context_length': 77},
                                      config)
  with pytest.raises(NotImplementedError, match='ModifiedResNet'):
    clip_weights.state_dict_to_params(
        {**state, 'visual.layer1.0.conv1.weight': np.zeros((1,))})
  with pytest.raises(ValueError, match='cannot infer .* missing '
                     'visual.conv1.weight'):
    clip_weights.state_dict_to_params(
        {k: v for k, v in state.items() if k != 'visual.conv1.weight'})
  # 48 is not a multiple of 64: heads cannot be inferred.
  with pytest.raises(ValueError, match='vision width 48 .* pass config='):
    clip_weights.state_dict_to_params(state)
  with pytest.raises(FileNotFoundError, match='no CLIP weights'):
    clip_weights.load_clip_params(tmp_path)


def test_torch_file_without_torch(tmp_path, monkeypatch):
  path = tmp_path / 'clip.pt'
  path.write_bytes(b'not read')
  monkeypatch.setitem(sys.modules, 'torch', None)  # import torch -> error
  with pytest.raises(ImportError, match='needs PyTorch.*safetensors'):
    clip_weights.load_clip_params(path)


def test_torchscript_error_says_resave(tmp_path):
  """A TorchScript file torch cannot load gets a 're-save' hint."""
  pytest.importorskip('torch')
  path = tmp_path / 'broken.pt'
  with zipfile.ZipFile(path, 'w') as z:
    z.writestr('broken/constants.pkl', b'junk')
    z.writestr('broken/code/__torch__.py', 'junk')
  with pytest.raises(ValueError, match='re-save its weights as a state dict'):
    clip_weights.load_clip_params(path, config=_config())


# ---------------------------------------------------------------------------
# Preprocessing
# ---------------------------------------------------------------------------


def _pil_reference(frame, size):
  """OpenAI's preprocess: PIL bicubic shortest side, centre crop, [0, 1]."""
  pil = pytest.importorskip('PIL.Image')
  h, w = frame.shape[:2]
  new_h, new_w = clip.resize_shape(h, w, size)
  image = pil.fromarray(frame).resize((new_w, new_h), pil.BICUBIC)
  array = np.asarray(image, np.float32) / 255.0
  top = int(round((new_h - size) / 2.0))
  left = int(round((new_w - size) / 2.0))
  return array[top:top + size, left:left + size]


@pytest.mark.parametrize('shape', [(96, 128), (20, 24), (32, 32)])
def test_preprocess_matches_pil_bicubic(shape):
  rng = np.random.default_rng(0)
  # Smooth content (what video frames mostly are) plus some noise.
  y, x = np.mgrid[0:shape[0], 0:shape[1]]
  base = np.stack([np.sin(x / 7.0), np.cos(y / 5.0), np.sin((x + y) / 9.0)],
                  -1)
  frame = np.clip(127.5 + 100 * base + rng.normal(0, 10, base.shape), 0,
                  255).astype(np.uint8)
  size = 32
  got = np.asarray(clip.preprocess_frames(frame[None], size))[0]
  got = got * np.asarray(clip.OPENAI_STD) + np.asarray(clip.OPENAI_MEAN)
  want = _pil_reference(frame, size)
  assert got.shape == want.shape == (size, size, 3)
  err = np.abs(got - want)
  # PIL rounds to uint8 (measured: max 0.99, mean 0.31 steps of 1/255).
  assert err.max() < 1.5 / 255, err.max() * 255
  assert err.mean() < 0.5 / 255, err.mean() * 255


# ---------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------

CAPTIONS = [
    'a red fox jumps over the lazy dog',
    'A RED FOX  jumps\tover\nthe dog!!!',
    'zoom out slowly over the sea at sunset',
    "it's a teddy bear's picnic, isn't it? they've, we'll, I'd, I'm",
    'a photo of 1234 apples and 3.14 pies',
    'time-lapse of clouds; 4k, hdr, 60fps',
    'café crème brûlée à la carte',
    'an astronaut riding a horse on mars, digital art',
    'Tom &amp; Jerry &lt;3 cartoons',
    'naïve coöperation ﬁne ligatures',
    '東京の夜景 timelapse',
    'emoji 🎬🍿 movie night 🌙',
    '“curly quotes” and ‘single’ ones',
    'smart quote mojibake: donâ€™t stop',
    'underscores_in_words and #hashtags @mentions',
    'Ⅻ roman numeral, ² superscript, ½ half',
    'the quick brown fox ' * 12,
    '',
    '   leading and trailing spaces   ',
    "''s double apostrophe and 'S upper",
    'ＦＵＬＬＷＩＤＴＨ ｔｅｘｔ',
]


def _merges():
  path = clip_tokenizer.default_merges_path()
  if path is None:
    pytest.skip('no bpe_simple_vocab_16e6.txt.gz (open_clip not installed)')
  return path


def test_tokenizer_matches_open_clip():
  open_clip, _ = import_open_clip()
  reference = open_clip.SimpleTokenizer(_merges())
  tok = clip_tokenizer.CLIPTokenizer(_merges())
  assert tok.vocab_size == reference.vocab_size == 49408
  assert (tok.sot_id, tok.eot_id) == (49406, 49407)
  for text in CAPTIONS:
    assert tok.encode(text) == reference.encode(text), text
  want = reference(CAPTIONS, context_length=77).numpy()
  got = tok.encode_batch(CAPTIONS)
  assert got.dtype == np.int32 and got.shape == (len(CAPTIONS), 77)
  np.testing.assert_array_equal(got, want)
  # Truncation keeps EOT last, as open_clip does.
  short = tok.encode_batch(CAPTIONS, context_length=8)
  np.testing.assert_array_equal(
      short, reference(CAPTIONS, context_length=8).numpy())
  assert short[16, -1] == tok.eot_id
  assert tok.decode(tok.encode_batch(['a red fox'])[0]) == 'a red fox'


def test_word_split_matches_regex_pattern():
  regex = pytest.importorskip('regex')
  pattern = regex.compile(
      r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|"""
      r"""[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""", regex.IGNORECASE)
  texts = [clip_tokenizer.clean_text(t) for t in CAPTIONS] + [
      "x<|endoftext|>y '' 's'T 'll'LL 100% ¾ ٣٤ à́ ſ'ſ a\u0301b",
      'mixed12ab,,,34 --- ...', "'s's's", 'don\'t\'t']
  for text in texts:
    assert clip_tokenizer.split_words(text) == pattern.findall(text), text


def test_cleanup_without_ftfy(monkeypatch):
  monkeypatch.setattr(clip_tokenizer, 'ftfy', None)
  text = '  \u201cCafe\u0301\u201d  it\u2019s &amp;amp; DONE '
  assert clip_tokenizer.clean_text(text) == '"caf\u00e9" it\'s & done'


def test_tokenizer_file_errors(tmp_path):
  path = tmp_path / 'bad.txt.gz'
  with gzip.open(path, 'wt') as f:
    f.write('#version: 0.2\na b\nnot-a-pair\n')
  with pytest.raises(ValueError, match=r"line 3: 'not-a-pair'"):
    clip_tokenizer.CLIPTokenizer(path)
