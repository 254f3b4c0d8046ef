"""text/encoder.py: captions to ids, cached embeddings, gradients into a frozen or a
trainable text encoder, and the encoder config.text builds.
"""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from phenaki_jax.config.schema import ConfigError
from phenaki_jax.models import t5
from phenaki_jax.text import encoder as text_encoder
from phenaki_jax.text import text_tokenizers
from tests.helpers import load_config, upload_folder, write_tiny_t5x

LENGTH = 8


def _byte_encoder(trainable):
  module = t5.T5EncoderConfig(vocab_size=t5.BYT5_TINY.vocab_size, d_model=16, d_kv=8, d_ff=32,
                              num_heads=2, num_layers=1).make_module()
  return text_encoder.TextEncoder(text_tokenizers.ByteTokenizer(), module, trainable=trainable)


def _ids_batch(text):
  ids, mask = text.tokenizer.encode_batch(["a red fox", "zoom out"], LENGTH)
  return {"text_ids": jnp.asarray(ids), "text_mask": jnp.asarray(mask)}


def _init(text):
  return nn.unbox(text.module.init(jax.random.key(0), jnp.ones((1, LENGTH), jnp.int32))["params"])


# --- tokenize_captions.

def test_tokenize_captions_replaces_captions_with_ids_and_mask():
  frames = np.zeros((2, 3, 4, 4, 3), np.float32)
  batch = {"frames": frames, "caption": np.array(["hi", "a long caption cut short"])}
  out = text_encoder.tokenize_captions(batch, text_tokenizers.ByteTokenizer(), LENGTH)
  assert set(out) == {"frames", "text_ids", "text_mask"}
  assert out["frames"] is frames
  want_ids, want_mask = text_tokenizers.ByteTokenizer().encode_batch(
      ["hi", "a long caption cut short"], LENGTH)
  assert out["text_ids"].shape == out["text_mask"].shape == (2, LENGTH)
  np.testing.assert_array_equal(out["text_ids"], want_ids)
  np.testing.assert_array_equal(out["text_mask"], want_mask)
  assert out["text_mask"][0].sum() == 3 and out["text_mask"][1].all()  # 'hi' + EOS; truncated
  assert "caption" in batch  # the input batch is left as it was


def test_a_batch_without_captions_is_left_untouched():
  batch = {"codes": np.zeros((2, 3), np.int32),
           "text_embeddings": np.ones((2, LENGTH, 4), np.float32),
           "text_mask": np.ones((2, LENGTH), bool)}
  out = text_encoder.tokenize_captions(batch, text_tokenizers.ByteTokenizer(), LENGTH)
  assert out == batch and out is not batch
  assert all(out[k] is batch[k] for k in batch)


# --- encode_text.

def test_cached_embeddings_are_used_when_the_batch_has_them():
  embeddings = jnp.arange(2 * LENGTH * 4, dtype=jnp.float32).reshape(2, LENGTH, 4)
  mask = jnp.array([[1] * 3 + [0] * 5, [1] * 8], jnp.int32)
  # No encoder parameters at all: reaching the encoder would fail.
  for trainable in (True, False):
    context, out_mask = text_encoder.encode_text(
        _byte_encoder(trainable), {}, None, {"text_embeddings": embeddings, "text_mask": mask,
                                             "text_ids": jnp.zeros((2, LENGTH), jnp.int32)})
    assert context is embeddings
    assert out_mask.dtype == jnp.bool_
    np.testing.assert_array_equal(out_mask, mask.astype(bool))


def _loss(text, params, frozen, batch):
  context, mask = text_encoder.encode_text(text, params, frozen, batch)
  return jnp.sum(jnp.square(context) * mask[..., None])


def test_no_gradient_reaches_a_frozen_encoder():
  text = _byte_encoder(trainable=False)
  frozen, batch = _init(text), _ids_batch(text)
  context, mask = jax.jit(lambda f: text_encoder.encode_text(text, {}, f, batch))(frozen)
  np.testing.assert_array_equal(mask, batch["text_mask"])
  assert context.shape == (2, LENGTH, 16)
  grads = jax.jit(jax.grad(lambda f: _loss(text, {}, f, batch)))(frozen)
  assert all(not np.asarray(g).any() for g in jax.tree.leaves(grads))
  # The same encoder made trainable does get gradients (so the zeros above are the stop).
  trained = jax.jit(jax.grad(lambda f: _loss(dataclasses.replace(text, trainable=True),
                                     {"text_encoder": f}, None, batch)))(frozen)
  assert any(np.asarray(g).any() for g in jax.tree.leaves(trained))


def test_a_trainable_encoder_is_read_from_the_params_and_gets_gradients():
  text = _byte_encoder(trainable=True)
  params, batch = {"text_encoder": _init(text), "generator": {"w": jnp.ones(3)}}, _ids_batch(text)
  # The frozen argument is ignored: its parameters are not the ones applied.
  decoy = jax.tree.map(jnp.zeros_like, params["text_encoder"])
  context, _ = text_encoder.encode_text(text, params, decoy, batch)
  want, _ = text.module.apply({"params": params["text_encoder"]}, batch["text_ids"],
                              batch["text_mask"])
  np.testing.assert_array_equal(context, want)
  grads = jax.jit(jax.grad(lambda p: _loss(text, p, decoy, batch)))(params)
  assert all(np.asarray(g).any() for g in jax.tree.leaves(grads["text_encoder"])
             if g.ndim)  # every weight matrix / scale moves
  assert not np.asarray(grads["generator"]["w"]).any()


# --- build_text_encoder.

def test_tiny_config_builds_the_trainable_byte_encoder():
  text_cfg = load_config("maskgit", "tiny").text
  assert text_cfg.encoder == "byte"
  text = text_encoder.build_text_encoder(text_cfg)
  assert isinstance(text.tokenizer, text_tokenizers.ByteTokenizer)
  # A byte encoder is always trained with the generator (config.text.frozen is for T5).
  assert text.trainable and text.pretrained is None
  b = text_cfg.byte_encoder
  assert text.width == b.width
  m = text.module
  assert (m.vocab_size, m.d_model, m.d_kv, m.d_ff, m.num_heads, m.num_layers) == (
      t5.BYT5_TINY.vocab_size, b.width, b.head_dim, b.mlp_dim, b.num_heads, b.num_layers)
  assert m.dtype == jnp.dtype(text_cfg.dtype)
  ids, _ = text.tokenizer.encode_batch(["a small red circle"], text_cfg.max_length)
  assert int(ids.max()) < m.vocab_size


def test_t5_path_in_a_bucket_builds_the_encoder_the_local_folder_builds(tmp_path, bucket):
  """config.text.t5_path on gs://: a T5X .npz with its spiece.model found beside it."""
  captions = ["a small red circle moves left", "a large blue square", "the green triangle"]
  local_npz, _ = write_tiny_t5x(tmp_path, captions)
  remote = upload_folder(tmp_path, f"{bucket}/t5x")
  text_cfg = load_config("maskgit", "tiny").text
  text_cfg.encoder = "t5"
  text_cfg.t5_path = local_npz
  local = text_encoder.build_text_encoder(text_cfg)
  text_cfg.t5_path = f"{remote}/t5x.npz"
  from_bucket = text_encoder.build_text_encoder(text_cfg)
  assert from_bucket.module == local.module and not from_bucket.trainable
  batch = {"caption": np.asarray(captions)}
  ids = text_encoder.tokenize_captions(batch, from_bucket.tokenizer, LENGTH)
  np.testing.assert_array_equal(
      ids["text_ids"], text_encoder.tokenize_captions(batch, local.tokenizer, LENGTH)["text_ids"])
  apply = jax.jit(local.module.apply)
  np.testing.assert_array_equal(
      apply({"params": from_bucket.pretrained}, ids["text_ids"], ids["text_mask"])[0],
      apply({"params": local.pretrained}, ids["text_ids"], ids["text_mask"])[0])
  text_cfg.t5_path = f"{bucket}/missing/t5x.npz"
  with pytest.raises(ConfigError, match=f"config.text.t5_path='{bucket}/missing/t5x.npz': "
                                        "does not exist"):
    text_encoder.build_text_encoder(text_cfg)
