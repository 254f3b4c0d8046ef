"""text/t5_weights.py: the HF safetensors and T5X loaders vs Hugging Face, and their errors.

The parity tests need the test extra (torch CPU, transformers, safetensors,
sentencepiece) and are skipped without it.
"""
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from phenaki_jax.models import t5
from phenaki_jax.text import t5_weights
from phenaki_jax.text import text_tokenizers
from tests.helpers import (T5_TEST_LENGTH, t5_ids_with_padding, torch_modules, train_sentencepiece,
                           upload_folder)

TINY = dict(vocab_size=256, d_model=32, d_kv=8, d_ff=64, num_heads=4,
            num_layers=2, relative_attention_num_buckets=32,
            # Small, so the test lengths reach the saturated bucket too.
            relative_attention_max_distance=16)


def _hf_model(kind='encoder', seed=0):
  """A tiny random HF T5 whose norms and position bias are non-trivial."""
  torch, transformers = torch_modules()
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
  torch, _ = torch_modules()
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
# HF safetensors
# ---------------------------------------------------------------------------


@pytest.mark.parametrize('kind', ['encoder', 'seq2seq'])
def test_hf_safetensors_parity(tmp_path, kind):
  model = _hf_model(kind)
  model.save_pretrained(tmp_path)
  params, config = t5_weights.load_hf_safetensors(tmp_path)
  # Sizes come from config.json, including the non-default max distance.
  assert config == t5.T5EncoderConfig(**TINY)

  ids, mask = t5_ids_with_padding()
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
  ids, mask = t5_ids_with_padding()
  _assert_close_on_mask(_ours(params, config, ids)[0],
                        _hf_encode(model, ids, mask), mask)


def test_load_t5_encoder_folder_local_and_from_a_bucket(tmp_path, bucket):
  model = _hf_model('seq2seq')
  folder = tmp_path / 'model'
  model.save_pretrained(folder)
  model_path, sentences, _ = train_sentencepiece(tmp_path)
  shutil.copy(model_path, folder / 'spiece.model')

  module, params, tokenizer = t5_weights.load_t5_encoder(folder)
  assert isinstance(tokenizer, text_tokenizers.SentencePieceTokenizer)
  ids, mask = tokenizer.encode_batch(sentences[:3], T5_TEST_LENGTH)
  apply = jax.jit(module.apply)
  out = np.asarray(apply({'params': params}, ids)[0])
  _assert_close_on_mask(out, _hf_encode(model, ids, mask), mask)

  # The same folder in a bucket: safetensors read tensor by tensor, config.json
  # and spiece.model from their bytes; the same ids, parameters and embeddings.
  remote = upload_folder(folder, f'{bucket}/t5')
  r_module, r_params, r_tokenizer = t5_weights.load_t5_encoder(remote)
  assert r_module == module
  r_ids, r_mask = r_tokenizer.encode_batch(sentences[:3], T5_TEST_LENGTH)
  np.testing.assert_array_equal(r_ids, ids)
  np.testing.assert_array_equal(r_mask, mask)
  jax.tree.map(np.testing.assert_array_equal, r_params, params)
  np.testing.assert_array_equal(np.asarray(apply({'params': r_params}, r_ids)[0]), out)
  with pytest.raises(NotADirectoryError, match=f'{bucket}/nothing'):
    t5_weights.load_t5_encoder(f'{bucket}/nothing')



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
  ids, mask = t5_ids_with_padding()
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
  ids, mask = t5_ids_with_padding()
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

