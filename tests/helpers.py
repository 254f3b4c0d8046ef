"""Shared test helpers: load shipped configs by variant, read run outputs."""
import importlib.util
import pathlib

REPO = pathlib.Path(__file__).resolve().parents[1]


def load_config(job: str, variant: str = ""):
  """configs/<job>.py:<variant>, as main.py would load it (unlocked copy)."""
  path = REPO / "configs" / f"{job}.py"
  spec = importlib.util.spec_from_file_location(f"configs_{job}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  # An unlocked copy, so tests can change values as --config.* overrides would.
  return module.get_config(variant).copy_and_resolve_references()


def write_tiny_t5x(folder, captions, seed=0):
  """A tiny random T5 encoder in T5X layout (t5x.npz) + a SentencePiece model
  (spiece.model) trained on `captions`, as a user's download would hold them.

  Returns (path of t5x.npz, the encoder params as loaded).
  """
  import jax
  import jax.numpy as jnp
  import numpy as np
  import sentencepiece as spm
  from phenaki_jax import sharding
  from phenaki_jax.models import t5

  folder = pathlib.Path(folder)
  corpus = folder / "corpus.txt"
  corpus.write_text("\n".join(captions) + "\n")
  spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(folder / "spiece"),
                                 vocab_size=27, minloglevel=2, pad_id=0, eos_id=1, unk_id=2,
                                 bos_id=-1)
  module = t5.T5EncoderConfig(vocab_size=256, d_model=16, d_kv=8, d_ff=32, num_heads=2,
                              num_layers=1).make_module()
  abstract = sharding.strip_boxes(
      jax.eval_shape(module.init, jax.random.key(0), jnp.ones((1, 4), jnp.int32))["params"])
  rng = np.random.default_rng(seed)
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: (np.ones(x.shape, x.dtype) if path[-1].key == "scale"
                       else rng.normal(0.0, 0.1, x.shape).astype(x.dtype)), abstract)
  # T5X layout: kernels flattened to (inputs, outputs), under target/.
  flat = {"target/token_embedder/embedding": params["token_embedder"]["embedding"]}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    keys = [k.key for k in path]
    if keys[0] == "token_embedder":
      continue
    in_axes = 2 if keys[-2] == "out" else 1
    flat["target/encoder/" + "/".join(keys)] = leaf.reshape(
        int(np.prod(leaf.shape[:in_axes])), -1) if keys[-1] == "kernel" else leaf
  np.savez(folder / "t5x.npz", **flat)
  return str(folder / "t5x.npz"), params


# --- T5 / text tests (tests/models/t5_test.py, tests/text/t5_weights_test.py,
# tests/text/text_tokenizers_test.py).

T5_TEST_LENGTH = 24


def t5_ids_with_padding(vocab_size=256, seed=0):
  """(ids, mask): 3 rows of T5_TEST_LENGTH ids, EOS-terminated at lengths 24, 17, 5, 0-padded."""
  import numpy as np
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, vocab_size, size=(3, T5_TEST_LENGTH)).astype(np.int32)
  lengths = [T5_TEST_LENGTH, 17, 5]
  for row, n in enumerate(lengths):
    ids[row, n - 1] = 1
    ids[row, n:] = 0
  return ids, ids != 0


def torch_modules():
  """(torch, transformers), skipping the test without the test extra (and safetensors)."""
  import pytest
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  pytest.importorskip('safetensors')
  return torch, transformers


def train_sentencepiece(tmp_path, **special_ids):
  """A 100-piece SentencePiece model trained on made-up sentences (T5 ids by default).

  Returns (model path, the sentences, the sentencepiece module).
  """
  import random
  import pytest
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


def upload_folder(local, remote):
  """Copies the local folder `local` (recursively) to `remote` (e.g. gs://BUCKET/x) with storage."""
  import os
  from phenaki_jax import storage
  for root, _, files in os.walk(local):
    for name in files:
      full = os.path.join(root, name)
      storage.upload(full, storage.join(remote, os.path.relpath(full, local).replace(os.sep, "/")))
  return remote


def prepare_media(out, **overrides):
  """tests/data/media/mixed.jsonl (good and broken files) prepared into `out` as clips the
  `:tiny` tokenizer takes (5 frames of 16×16); returns the prepare job's summary."""
  from phenaki_jax.data import prepare
  config = prepare.default_config()
  config.update(dict(manifest=str(REPO / "tests" / "data" / "media" / "mixed.jsonl"),
                     resolution=16, num_frames=5, num_workers=1, progress=False))
  config.update(overrides)
  return prepare.run(config, str(out))


def tokenizer_train_state(config, mesh):
  """(model, optimizer, initial TokenizerState on `mesh`) of a completed cvivit config, as the
  trainer builds them; call it inside sharding.use_mesh(mesh, config.logical_axis_rules)."""
  import jax
  from phenaki_jax import optimizers, train_state
  model = train_state.build_cvivit(config)
  tx = optimizers.make_optimizer(config.optimizer, config.total_steps)
  _, shardings, init = train_state.cvivit_abstract_state(config, model, tx, mesh)
  return model, tx, jax.jit(init, out_shardings=shardings)(jax.random.key(0))
