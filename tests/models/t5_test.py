"""T5 encoder: numerics vs Hugging Face, weight loaders, tokenizers.

The parity tests need the test extra (torch CPU, transformers, safetensors,
sentencepiece) and are skipped without it.
"""
import os
import random
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from phenaki_jax.models import t5
from phenaki_jax.text import t5_weights
from phenaki_jax.text import text_tokenizers

TINY = dict(vocab_size=256, d_model=32, d_kv=8, d_ff=64, num_heads=4,
            num_layers=2, relative_attention_num_buckets=32,
            # Small, so the test lengths reach the saturated bucket too.
            relative_attention_max_distance=16)
LENGTH = 24


def _ids_with_padding(vocab_size=256, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, vocab_size, size=(3, LENGTH)).astype(np.int32)
  lengths = [LENGTH, 17, 5]
  for row, n in enumerate(lengths):
    ids[row, n - 1] = 1
    ids[row, n:] = 0
  return ids, ids != 0


def _torch_modules():
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  pytest.importorskip('safetensors')
  return torch, transformers


def _hf_model(kind='encoder', seed=0):
  """A tiny random HF T5 whose norms and position bias are non-trivial."""
  torch, transformers = _torch_modules()
  torch.manual_seed(seed)
  cfg = transformers.T5Config(
      feed_forward_proj='gated-gelu', dropout_rate=0.0, num_decoder_layers=1,
      tie_word_embeddings=False, **TINY)
  cls = (transformers.T5EncoderModel if kind == 'encoder'
         else transformers.T5ForConditionalGeneration)
  model = cls(cfg).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      # HF initialises norms to 1; random scales make a transposed or swapped
      # norm mapping visible.
      if 'layer_norm' in name:
        p.uniform_(0.5, 1.5)
      if 'relative_attention_bias' in name:
        p.normal_(0.0, 1.0)
  return model


def _hf_encode(model, ids, mask):
  torch, _ = _torch_modules()
  encoder = model.get_encoder() if hasattr(model, 'get_encoder') else model
  with torch.no_grad():
    out = encoder(input_ids=torch.from_numpy(ids.astype(np.int64)),
                  attention_mask=torch.from_numpy(mask.astype(np.int64)))
  return out.last_hidden_state.numpy()


def _ours(params, config, ids, mask=None, dtype=jnp.float32):
  module = config.make_module(dtype=dtype)
  out, out_mask = jax.jit(module.apply)({'params': params}, jnp.asarray(ids),
                                        None if mask is None else
                                        jnp.asarray(mask))
  return np.asarray(out, np.float32), np.asarray(out_mask)


def _assert_close_on_mask(ours, ref, mask, atol=1e-4):
  diff = np.abs(ours - ref)[mask]
  assert diff.max() < atol, diff.max()


def _state_dict(model):
  return {k: v.detach().numpy() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------
# Module numerics
# ---------------------------------------------------------------------------


@pytest.mark.parametrize('buckets,max_distance', [(32, 128), (32, 16),
                                                  (64, 256)])
def test_relative_position_buckets_match_hf(buckets, max_distance):
  torch, _ = _torch_modules()
  modeling_t5 = pytest.importorskip('transformers.models.t5.modeling_t5')
  n = 300
  rel = torch.arange(n)[None, :] - torch.arange(n)[:, None]
  want = modeling_t5.T5Attention._relative_position_bucket(
      rel, bidirectional=True, num_buckets=buckets,
      max_distance=max_distance).numpy()
  got = t5.relative_position_buckets(n, n, buckets, max_distance)
  np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize('kind', ['encoder', 'seq2seq'])
def test_hf_safetensors_parity(tmp_path, kind):
  model = _hf_model(kind)
  model.save_pretrained(tmp_path)
  params, config = t5_weights.load_hf_safetensors(tmp_path)
  # Sizes come from config.json, including the non-default max distance.
  assert config == t5.T5EncoderConfig(**TINY)

  ids, mask = _ids_with_padding()
  ref = _hf_encode(model, ids, mask)
  ours, out_mask = _ours(params, config, ids)
  np.testing.assert_array_equal(out_mask, mask)
  _assert_close_on_mask(ours, ref, mask)


def test_hf_config_inferred_from_shapes_without_config_json(tmp_path):
  model = _hf_model()
  model.save_pretrained(tmp_path)
  os.remove(tmp_path / 'config.json')
  params, config = t5_weights.load_hf_safetensors(
      tmp_path / 'model.safetensors')
  # Everything but the max distance is visible in the shapes.
  assert config == t5.T5EncoderConfig(
      **{**TINY, 'relative_attention_max_distance': 128})
  config = t5.T5EncoderConfig(**TINY)
  ids, mask = _ids_with_padding()
  _assert_close_on_mask(_ours(params, config, ids)[0],
                        _hf_encode(model, ids, mask), mask)


def test_padding_does_not_change_real_tokens():
  module = t5.BYT5_TINY.make_module()
  ids, mask = _ids_with_padding(vocab_size=259)
  variables = module.init(jax.random.key(0), jnp.asarray(ids))
  apply = jax.jit(module.apply)
  out, out_mask = apply(variables, jnp.asarray(ids))
  np.testing.assert_array_equal(out_mask, mask)

  # Junk in padded slots, flagged as padding by an explicit mask.
  rng = np.random.default_rng(1)
  junk = np.where(mask, ids, rng.integers(3, 259, ids.shape))
  out2, _ = apply(variables, jnp.asarray(junk), jnp.asarray(mask))
  np.testing.assert_allclose(np.asarray(out2)[mask], np.asarray(out)[mask],
                             atol=1e-5)
  # Fewer padded positions (rows 1 and 2 fit in 17) give the same outputs on
  # the real tokens.
  short = mask[1:, :17]
  out3, _ = apply(variables, jnp.asarray(ids[1:, :17]))
  np.testing.assert_allclose(np.asarray(out3)[short],
                             np.asarray(out)[1:, :17][short], atol=1e-5)


def test_byte_encoder_jit_and_bf16():
  module = t5.BYT5_TINY.make_module()
  tok = text_tokenizers.ByteTokenizer()
  ids, mask = tok.encode_batch(['a red fox', 'zoom out slowly over the sea'],
                               16)
  variables = module.init(jax.random.key(0), jnp.asarray(ids))
  eager, _ = module.apply(variables, ids)
  jitted, _ = jax.jit(module.apply)(variables, ids)
  assert eager.shape == (2, 16, t5.BYT5_TINY.d_model)
  np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), atol=1e-5)
  assert np.isfinite(np.asarray(eager)).all()

  bf16 = t5.BYT5_TINY.make_module(dtype=jnp.bfloat16)
  out, _ = jax.jit(bf16.apply)(variables, ids)
  assert out.dtype == jnp.bfloat16
  err = np.abs(np.asarray(out, np.float32) - np.asarray(eager))[mask]
  assert err.max() < 0.1 * np.abs(np.asarray(eager)).max()


def test_logical_axes_and_sharded_numerics():
  module = t5.BYT5_TINY.make_module()
  ids = jnp.asarray(_ids_with_padding(vocab_size=259)[0][:2, :16])
  ids = jnp.concatenate([ids] * 4)  # batch 8 divides the mesh
  variables = module.init(jax.random.key(0), ids)
  axes = nn.get_partition_spec(variables)['params']
  assert tuple(axes['token_embedder']['embedding']) == ('vocab', 'embed')
  assert tuple(axes['relpos_bias']['rel_embedding']) == ('heads',
                                                         'relpos_buckets')
  layer = axes['layers_0']
  assert tuple(layer['attention']['query']['kernel']) == ('embed', 'heads',
                                                          'kv')
  assert tuple(layer['attention']['out']['kernel']) == ('heads', 'kv', 'embed')
  assert tuple(layer['mlp']['wo']['kernel']) == ('mlp', 'embed')
  assert tuple(layer['pre_mlp_layer_norm']['scale']) == ('embed',)

  params = nn.unbox(variables)
  want, _ = jax.jit(module.apply)(params, ids)
  mesh = jax.make_mesh((2, 2, 2), ('data', 'fsdp', 'tensor'),
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  rules = (('act_batch', ('data', 'fsdp')), ('act_heads', 'tensor'),
           ('act_mlp', 'tensor'), ('act_len', None), ('act_embed', None))
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    fn = jax.jit(module.apply)
    assert 'sharding_constraint' in fn.lower(params, ids).as_text()
    got, _ = fn(params, ids)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)


# ---------------------------------------------------------------------------
# T5X layout
# ---------------------------------------------------------------------------


def _hf_to_t5x_tree(state, num_layers):
  """Writes the HF weights in T5X's published layout, plus ignored extras."""
  enc = {
      'relpos_bias': {'rel_embedding': state[
          'encoder.block.0.layer.0.SelfAttention.relative_attention_bias.'
          'weight'].T},
      'encoder_norm': {'scale': state['encoder.final_layer_norm.weight']},
  }
  for i in range(num_layers):
    hf = f'encoder.block.{i}.layer'
    enc[f'layers_{i}'] = {
        'attention': {
            name: {'kernel': state[f'{hf}.0.SelfAttention.{p}.weight'].T}
            for p, name in (('q', 'query'), ('k', 'key'), ('v', 'value'),
                            ('o', 'out'))},
        'pre_attention_layer_norm': {
            'scale': state[f'{hf}.0.layer_norm.weight']},
        'mlp': {w: {'kernel': state[f'{hf}.1.DenseReluDense.{w}.weight'].T}
                for w in ('wi_0', 'wi_1', 'wo')},
        'pre_mlp_layer_norm': {'scale': state[f'{hf}.1.layer_norm.weight']},
    }
  return {
      'target': {
          'token_embedder': {'embedding': state['shared.weight']},
          'encoder': enc,
          'decoder': {'decoder_norm': {'scale': np.ones((32,), np.float32)}},
      },
      'state': {'step': np.asarray(7, np.int32),
                'param_states': {'x': np.zeros((3,), np.float32)}},
  }


def _flatten(tree, prefix=''):
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f'{prefix}{k}/'))
    else:
      out[f'{prefix}{k}'] = np.ascontiguousarray(v)
  return out


@pytest.mark.parametrize('fmt', ['dict', 'npz', 'msgpack', 'orbax'])
def test_t5x_layout_parity(tmp_path, fmt):
  model = _hf_model()
  tree = _hf_to_t5x_tree(_state_dict(model), TINY['num_layers'])
  if fmt == 'dict':
    source = tree
  elif fmt == 'npz':
    source = tmp_path / 'ckpt.npz'
    np.savez(source, **_flatten(tree))
  elif fmt == 'msgpack':
    from flax import serialization  # pylint: disable=g-import-not-at-top
    source = tmp_path / 'ckpt.msgpack'
    source.write_bytes(serialization.msgpack_serialize(tree))
  else:
    ocp = pytest.importorskip('orbax.checkpoint')
    source = tmp_path / 'checkpoint_7'
    ocp.PyTreeCheckpointer().save(source, jax.tree.map(np.ascontiguousarray,
                                                       tree))
  config = t5.T5EncoderConfig(**TINY)
  params, got_config = t5_weights.load_t5x_params(source, config=config)
  assert got_config == config
  ids, mask = _ids_with_padding()
  _assert_close_on_mask(_ours(params, config, ids)[0],
                        _hf_encode(model, ids, mask), mask)

  # Without a config every size but the max distance is inferred.
  _, inferred = t5_weights.load_t5x_params(source)
  assert inferred == t5.T5EncoderConfig(
      **{**TINY, 'relative_attention_max_distance': 128})


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


def test_errors_name_each_bad_parameter():
  state = _state_dict(_hf_model())
  config = t5.T5EncoderConfig(**TINY)
  wo = 'encoder.block.1.layer.1.DenseReluDense.wo.weight'
  del state[wo]
  state['encoder.block.0.layer.0.SelfAttention.extra.weight'] = np.zeros(3)
  state['encoder.final_layer_norm.weight'] = np.ones(64, np.float32)
  # Ignored, not unexpected: decoder, LM head, the tied embedding alias.
  state['decoder.block.0.whatever'] = np.zeros(2)
  state['lm_head.weight'] = np.zeros((256, 32), np.float32)
  state['encoder.embed_tokens.weight'] = state['shared.weight']
  with pytest.raises(ValueError) as err:
    t5_weights.hf_state_to_params(state, config, source='/ckpt')
  msg = str(err.value)
  assert msg.startswith('T5 checkpoint /ckpt: ')
  assert f'missing {wo}' in msg
  assert 'unexpected encoder.block.0.layer.0.SelfAttention.extra.weight' in msg
  assert ('shape mismatch encoder.final_layer_norm.weight: '
          'checkpoint (64,) vs model (32,)') in msg
  assert 'decoder' not in msg and 'lm_head' not in msg
  assert 'embed_tokens' not in msg


def test_hf_state_dict_with_only_encoder_embed_tokens():
  model = _hf_model()
  state = _state_dict(model)
  state['encoder.embed_tokens.weight'] = state.pop('shared.weight')
  params, config = t5_weights.hf_state_to_params(
      state, t5.T5EncoderConfig(**TINY))
  ids, mask = _ids_with_padding()
  _assert_close_on_mask(_ours(params, config, ids)[0],
                        _hf_encode(model, ids, mask), mask)


def test_errors_from_files(tmp_path):
  model = _hf_model()
  model.save_pretrained(tmp_path)
  config = t5.T5EncoderConfig(**{**TINY, 'num_layers': 3})
  with pytest.raises(ValueError, match=(
      r'T5 checkpoint .*: missing encoder\.block\.2\.layer\.0\.SelfAttention'
      r'\.q\.weight.*')):
    t5_weights.load_hf_safetensors(tmp_path, config=config)

  tree = _hf_to_t5x_tree(_state_dict(model), TINY['num_layers'])
  tree['target']['encoder']['layers_0']['mlp']['wi_0']['kernel'] = np.zeros(
      (32, 65), np.float32)
  path = tmp_path / 'bad.npz'
  np.savez(path, **_flatten(tree))
  with pytest.raises(ValueError, match=(
      r'bad\.npz: shape mismatch target/encoder/layers_0/mlp/wi_0/kernel: '
      r'checkpoint \(32, 65\) vs model \(32, 64\)')):
    t5_weights.load_t5x_params(path, config=t5.T5EncoderConfig(**TINY))

  with pytest.raises(NotImplementedError, match='gated-gelu'):
    t5_weights.config_from_hf({'feed_forward_proj': 'relu'})


# ---------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------


def test_byte_tokenizer():
  tok = text_tokenizers.ByteTokenizer()
  assert tok.vocab_size == 259
  assert tok.encode('hi') == [ord('h') + 3, ord('i') + 3, 1]
  text = 'héllo, 世界 🎬'
  assert tok.decode(tok.encode(text)) == text

  ids, mask = tok.encode_batch(['hi', 'abcdefgh', ''], max_length=5)
  assert ids.dtype == np.int32 and ids.shape == (3, 5)
  np.testing.assert_array_equal(ids[0], [107, 108, 1, 0, 0])
  # Truncated, but still ends in EOS.
  np.testing.assert_array_equal(ids[1], [100, 101, 102, 103, 1])
  np.testing.assert_array_equal(ids[2], [1, 0, 0, 0, 0])
  np.testing.assert_array_equal(mask, ids != 0)
  # A multi-byte character cut by truncation is dropped, not mangled.
  ids, _ = tok.encode_batch(['a世'], max_length=3)
  assert tok.decode(ids[0]) == 'a'


def _train_sentencepiece(tmp_path, **special_ids):
  spm = pytest.importorskip('sentencepiece')
  rng = random.Random(0)
  syllables = 'ka ro mi te su na lo vi pe da go ri zu'.split()
  words = [''.join(rng.choice(syllables) for _ in range(rng.randint(1, 3)))
           for _ in range(150)]
  corpus = tmp_path / 'corpus.txt'
  sentences = [' '.join(rng.choice(words) for _ in range(rng.randint(3, 12)))
               for _ in range(300)]
  corpus.write_text('\n'.join(sentences) + '\n')
  prefix = tmp_path / 'spiece'
  special_ids = special_ids or dict(pad_id=0, eos_id=1, unk_id=2, bos_id=-1)
  spm.SentencePieceTrainer.train(
      input=str(corpus), model_prefix=str(prefix), vocab_size=100,
      minloglevel=2, **special_ids)
  return f'{prefix}.model', sentences, spm


def test_sentencepiece_tokenizer(tmp_path):
  model_path, sentences, spm = _train_sentencepiece(tmp_path)
  tok = text_tokenizers.SentencePieceTokenizer(model_path)
  assert tok.vocab_size == 100 + 100
  raw = spm.SentencePieceProcessor(model_file=model_path)
  texts = sentences[:4] + ['zulo xyz!', '']
  for text in texts:
    assert tok.encode(text) == raw.encode(text) + [1]

  max_length = 12
  ids, mask = tok.encode_batch(texts, max_length)
  for row, text in enumerate(texts):
    want = raw.encode(text)[:max_length - 1] + [1]
    np.testing.assert_array_equal(ids[row, :len(want)], want)
    assert (ids[row, len(want):] == 0).all()
    assert mask[row].sum() == len(want)
  assert tok.decode(ids[0]) == raw.decode(raw.encode(texts[0])[:11])

  transformers = pytest.importorskip('transformers')
  hf_dir = tmp_path / 'hf'
  hf_dir.mkdir()
  shutil.copy(model_path, hf_dir / 'spiece.model')
  hf_tok = transformers.T5Tokenizer.from_pretrained(hf_dir)
  for text in texts:
    assert tok.encode(text) == hf_tok(text).input_ids


def test_sentencepiece_rejects_non_t5_ids(tmp_path):
  # sentencepiece's own defaults: unk 0, bos 1, eos 2, no pad.
  model_path, _, _ = _train_sentencepiece(tmp_path, unk_id=0, bos_id=1,
                                          eos_id=2, pad_id=-1)
  with pytest.raises(ValueError, match='pad/eos/unk = 0/1/2'):
    text_tokenizers.SentencePieceTokenizer(model_path)


def test_load_t5_encoder_folder(tmp_path):
  model = _hf_model('seq2seq')
  folder = tmp_path / 'model'
  model.save_pretrained(folder)
  model_path, sentences, _ = _train_sentencepiece(tmp_path)
  shutil.copy(model_path, folder / 'spiece.model')

  module, params, tokenizer = t5_weights.load_t5_encoder(folder)
  assert isinstance(tokenizer, text_tokenizers.SentencePieceTokenizer)
  ids, mask = tokenizer.encode_batch(sentences[:3], LENGTH)
  out, _ = jax.jit(module.apply)({'params': params}, ids)
  _assert_close_on_mask(np.asarray(out), _hf_encode(model, ids, mask), mask)
