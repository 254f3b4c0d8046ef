"""Loads pretrained T5 encoder weights into `t5.T5Encoder` parameters.

Two source formats, each with one mapping table from checkpoint names to our
parameter paths:

* Hugging Face `T5EncoderModel` / `T5ForConditionalGeneration` safetensors
  (one file, a sharded folder, or an in-memory state dict). Only the encoder
  and the shared embedding are read; decoder and lm_head keys are ignored.
  torch Linear weights are (out, in) and are transposed.
* T5X parameter trees as Google publishes them (`target/encoder/...`,
  `target/token_embedder/embedding`), from a nested or '/'-flattened dict of
  arrays, an .npz, a flax msgpack file, or an Orbax PyTree checkpoint folder.
  T5X stores attention kernels flattened to 2D; they are reshaped.

Every problem is reported at once: missing, unexpected and mis-shaped
parameters, each by its checkpoint name. Parameters come back as a nested
dict of numpy arrays (host memory), ready for `module.apply({'params': p})`
or for `jax.device_put` with shardings.
"""
from __future__ import annotations

import dataclasses
import io
import math
import os
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from phenaki_jax import safetensors_reader, storage
from phenaki_jax.models import t5
from phenaki_jax.text import text_tokenizers

PathLike = str | os.PathLike[str]
Params = dict[str, Any]

# Layouts: how a checkpoint array relates to our parameter.
_SAME = 'same'              # identical shape
_TRANSPOSE = 'transpose'    # 2D, axes swapped
_TORCH_LINEAR = 'torch'     # (prod(out), prod(in)) -> (in..., out...)
_FLAT_KERNEL = 'flat'       # (prod(in), prod(out)) -> (in..., out...)


@dataclasses.dataclass(frozen=True)
class _Entry:
  """One parameter: checkpoint name(s), our path, and the layout between."""
  keys: tuple[str, ...]  # Aliases; the first present in the checkpoint wins.
  path: tuple[str, ...]
  layout: str = _SAME
  in_axes: int = 1  # Leading axes of our kernel that are inputs.


def _checkpoint_shape(entry: _Entry, model_shape: Sequence[int]
                      ) -> tuple[int, ...]:
  model_shape = tuple(model_shape)
  if entry.layout == _SAME:
    return model_shape
  if entry.layout == _TRANSPOSE:
    return model_shape[::-1]
  n_in = math.prod(model_shape[:entry.in_axes])
  n_out = math.prod(model_shape[entry.in_axes:])
  if entry.layout == _TORCH_LINEAR:
    return (n_out, n_in)
  if entry.layout == _FLAT_KERNEL:
    return (n_in, n_out)
  raise ValueError(f'unknown layout {entry.layout}')


def _to_model(entry: _Entry, array: np.ndarray, model_shape: Sequence[int]
              ) -> np.ndarray:
  if entry.layout in (_TRANSPOSE, _TORCH_LINEAR):
    array = array.T
  return np.reshape(array, tuple(model_shape))


def _hf_table(num_layers: int) -> list[_Entry]:
  """Hugging Face T5 names (`T5EncoderModel` and the encoder of seq2seq)."""
  table = [
      # T5EncoderModel ties encoder.embed_tokens to shared; save_pretrained
      # keeps one of them, older exports keep both.
      _Entry(('shared.weight', 'encoder.embed_tokens.weight'),
             ('token_embedder', 'embedding')),
      _Entry(('encoder.block.0.layer.0.SelfAttention.'
              'relative_attention_bias.weight',),
             ('relpos_bias', 'rel_embedding'), _TRANSPOSE),
      _Entry(('encoder.final_layer_norm.weight',), ('encoder_norm', 'scale')),
  ]
  for i in range(num_layers):
    hf = f'encoder.block.{i}.layer'
    ours = f'layers_{i}'
    for proj, name in (('q', 'query'), ('k', 'key'), ('v', 'value')):
      table.append(_Entry((f'{hf}.0.SelfAttention.{proj}.weight',),
                          (ours, 'attention', name, 'kernel'), _TORCH_LINEAR))
    table += [
        _Entry((f'{hf}.0.SelfAttention.o.weight',),
               (ours, 'attention', 'out', 'kernel'), _TORCH_LINEAR, 2),
        _Entry((f'{hf}.0.layer_norm.weight',),
               (ours, 'pre_attention_layer_norm', 'scale')),
        _Entry((f'{hf}.1.layer_norm.weight',),
               (ours, 'pre_mlp_layer_norm', 'scale')),
    ]
    for w in ('wi_0', 'wi_1', 'wo'):
      table.append(_Entry((f'{hf}.1.DenseReluDense.{w}.weight',),
                          (ours, 'mlp', w, 'kernel'), _TORCH_LINEAR))
  return table


_HF_IGNORED_PREFIXES = ('decoder.', 'lm_head.')


def _t5x_table(num_layers: int) -> list[_Entry]:
  """T5X names (`t5x/examples/t5/network.py` under `target/`)."""
  table = [
      _Entry(('target/token_embedder/embedding',),
             ('token_embedder', 'embedding')),
      _Entry(('target/encoder/relpos_bias/rel_embedding',),
             ('relpos_bias', 'rel_embedding')),
      _Entry(('target/encoder/encoder_norm/scale',), ('encoder_norm', 'scale')),
  ]
  for i in range(num_layers):
    t5x = f'target/encoder/layers_{i}'
    ours = f'layers_{i}'
    for name in ('query', 'key', 'value'):
      table.append(_Entry((f'{t5x}/attention/{name}/kernel',),
                          (ours, 'attention', name, 'kernel'), _FLAT_KERNEL))
    table += [
        _Entry((f'{t5x}/attention/out/kernel',),
               (ours, 'attention', 'out', 'kernel'), _FLAT_KERNEL, 2),
        _Entry((f'{t5x}/pre_attention_layer_norm/scale',),
               (ours, 'pre_attention_layer_norm', 'scale')),
        _Entry((f'{t5x}/pre_mlp_layer_norm/scale',),
               (ours, 'pre_mlp_layer_norm', 'scale')),
    ]
    for w in ('wi_0', 'wi_1', 'wo'):
      table.append(_Entry((f'{t5x}/mlp/{w}/kernel',),
                          (ours, 'mlp', w, 'kernel'), _FLAT_KERNEL))
  return table


# Optimizer state, the decoder and the LM head are not part of the encoder.
_T5X_IGNORED_PREFIXES = ('state/', 'target/decoder/', 'target/logits_dense/',
                         'version')


def _model_shapes(config: t5.T5EncoderConfig) -> dict[tuple[str, ...],
                                                      tuple[int, ...]]:
  shapes = t5.param_shapes(config.make_module())
  flat = {}

  def walk(tree, prefix):
    for k, v in tree.items():
      if isinstance(v, Mapping):
        walk(v, prefix + (k,))
      else:
        flat[prefix + (k,)] = tuple(v.shape)

  walk(shapes, ())
  return flat


def _map_checkpoint(source: str, shapes: Mapping[str, tuple[int, ...]],
                    read: Callable[[str], np.ndarray], table: list[_Entry],
                    ignored_prefixes: Sequence[str],
                    config: t5.T5EncoderConfig, dtype: Any) -> Params:
  """Checks names and shapes against `table`, then reads and converts."""
  model_shapes = _model_shapes(config)
  table_paths = {e.path for e in table}
  if table_paths != set(model_shapes):
    # A model/table drift is our bug, not the checkpoint's.
    raise AssertionError(
        f'mapping table out of sync with T5Encoder: '
        f'{sorted(set(model_shapes) ^ table_paths)}')

  missing, mismatched, plan = [], [], []
  consumed = set()
  for entry in table:
    present = [k for k in entry.keys if k in shapes]
    consumed.update(present)
    if not present:
      missing.append(' or '.join(entry.keys))
      continue
    key = present[0]
    want = _checkpoint_shape(entry, model_shapes[entry.path])
    got = tuple(shapes[key])
    if got != want:
      mismatched.append(f'{key}: checkpoint {got} vs model {want}')
      continue
    plan.append((entry, key))
  unexpected = sorted(
      k for k in shapes
      if k not in consumed and not k.startswith(tuple(ignored_prefixes)))

  problems = []
  if missing:
    problems.append('missing ' + ', '.join(missing))
  if unexpected:
    problems.append('unexpected ' + ', '.join(unexpected))
  if mismatched:
    problems.append('shape mismatch ' + ', '.join(mismatched))
  if problems:
    raise ValueError(f'T5 checkpoint {source}: ' + '; '.join(problems))

  params: Params = {}
  for entry, key in plan:
    array = np.asarray(read(key))
    value = _to_model(entry, array, model_shapes[entry.path])
    node = params
    for name in entry.path[:-1]:
      node = node.setdefault(name, {})
    node[entry.path[-1]] = np.asarray(value, dtype=dtype)
  return params


# ---------------------------------------------------------------------------
# Hugging Face
# ---------------------------------------------------------------------------


def config_from_hf(config: PathLike | Mapping[str, Any]
                   ) -> t5.T5EncoderConfig:
  """Encoder sizes from a Hugging Face T5 `config.json` (path or dict)."""
  if not isinstance(config, Mapping):
    config = storage.read_json(config)
  proj = config.get('feed_forward_proj', 'relu')
  if proj != 'gated-gelu':
    # T5 v1.0 ('relu', single `wi`) and other variants have different weights.
    raise NotImplementedError(
        f'T5Encoder implements T5 v1.1 (feed_forward_proj="gated-gelu"); '
        f'this config has {proj!r}')
  return t5.T5EncoderConfig(
      vocab_size=int(config['vocab_size']),
      d_model=int(config['d_model']),
      d_kv=int(config['d_kv']),
      d_ff=int(config['d_ff']),
      num_heads=int(config['num_heads']),
      num_layers=int(config['num_layers']),
      relative_attention_num_buckets=int(
          config.get('relative_attention_num_buckets', 32)),
      relative_attention_max_distance=int(
          config.get('relative_attention_max_distance', 128)),
      layer_norm_epsilon=float(config.get('layer_norm_epsilon', 1e-6)),
      # The encoder is frozen in Phenaki; dropout stays off.
      dropout_rate=0.0)


def _count_layers(keys, prefix: str, sep: str) -> int:
  ids = set()
  for k in keys:
    if k.startswith(prefix):
      head = k[len(prefix):].split(sep, 1)[0]
      if head.isdigit():
        ids.add(int(head))
  return max(ids) + 1 if ids else 0


def _infer_config(shapes: Mapping[str, tuple[int, ...]],
                  embed_keys: Sequence[str], relpos_key: str, query_key: str,
                  wi_key: str, num_layers: int, torch_layout: bool,
                  source: str) -> t5.T5EncoderConfig:
  """Sizes from parameter shapes, for checkpoints without a config."""
  try:
    embed = next(shapes[k] for k in embed_keys if k in shapes)
    relpos, query, wi = shapes[relpos_key], shapes[query_key], shapes[wi_key]
  except (KeyError, StopIteration):
    raise ValueError(
        f'T5 checkpoint {source}: cannot infer the config from its shapes '
        f'(needs {embed_keys[0]}, {relpos_key}, {query_key}, {wi_key}); '
        'pass config=') from None
  # torch Linear weights are (out, in); T5X kernels and tables the other way.
  if torch_layout:
    (buckets, heads), inner, d_ff = relpos, query[0], wi[0]
  else:
    (heads, buckets), inner, d_ff = relpos, query[1], wi[1]
  return t5.T5EncoderConfig(
      vocab_size=embed[0], d_model=embed[1], d_kv=inner // heads, d_ff=d_ff,
      num_heads=heads, num_layers=num_layers,
      relative_attention_num_buckets=buckets)


def _infer_hf_config(shapes, source) -> t5.T5EncoderConfig:
  return _infer_config(
      shapes, ('shared.weight', 'encoder.embed_tokens.weight'),
      'encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight',
      'encoder.block.0.layer.0.SelfAttention.q.weight',
      'encoder.block.0.layer.1.DenseReluDense.wi_0.weight',
      _count_layers(shapes, 'encoder.block.', '.'),
      torch_layout=True, source=source)


def hf_state_to_params(state: Mapping[str, Any],
                       config: Optional[t5.T5EncoderConfig] = None,
                       dtype: Any = np.float32,
                       source: str = '<state dict>'
                       ) -> tuple[Params, t5.T5EncoderConfig]:
  """Maps an in-memory HF state dict (name -> array) to our parameters."""
  shapes = {k: tuple(np.shape(v)) for k, v in state.items()}
  if config is None:
    config = _infer_hf_config(shapes, source)
  params = _map_checkpoint(source, shapes, lambda k: np.asarray(state[k]),
                           _hf_table(config.num_layers), _HF_IGNORED_PREFIXES,
                           config, dtype)
  return params, config


def _safetensors_files(path: PathLike) -> list[str]:
  path = os.fspath(path)
  if storage.isdir(path):
    files = storage.glob(path, '*.safetensors')
    if not files:
      raise FileNotFoundError(f'no *.safetensors in {path}')
    return files
  if not storage.exists(path):
    raise FileNotFoundError(path)
  return [path]


def load_hf_safetensors(path: PathLike,
                        config: Optional[t5.T5EncoderConfig] = None,
                        dtype: Any = np.float32
                        ) -> tuple[Params, t5.T5EncoderConfig]:
  """Loads HF T5 encoder weights from a .safetensors file or a folder of them.

  Only the tensors the encoder needs are read, so a sharded
  T5ForConditionalGeneration checkpoint costs no memory for its decoder (and,
  on gs://, no transfer: safetensors_reader.SafetensorsReader reads tensor by tensor).

  Args:
    path: a .safetensors file, or a folder with one or more (sharded) files;
      local or gs://.
    config: encoder sizes; by default read from `config.json` next to the
      weights, or else inferred from the tensor shapes.
    dtype: numpy dtype of the returned parameters.

  Returns:
    (params, config).
  """
  try:
    import safetensors  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError as e:
    raise ImportError('loading HF T5 weights needs `safetensors` '
                      '(pip install safetensors)') from e
  files = _safetensors_files(path)
  source = os.fspath(path)
  handles = [safetensors_reader.SafetensorsReader(f) for f in files]
  try:
    shapes, owner = {}, {}
    for handle in handles:
      for key in handle.keys():
        shapes[key] = handle.shape(key)
        owner[key] = handle
    if config is None:
      config_json = storage.join(storage.dirname(files[0]), 'config.json')
      if storage.exists(config_json):
        config = config_from_hf(config_json)
      else:
        config = _infer_hf_config(shapes, source)
    params = _map_checkpoint(source, shapes, lambda k: owner[k].get_tensor(k),
                             _hf_table(config.num_layers), _HF_IGNORED_PREFIXES,
                             config, dtype)
  finally:
    for handle in handles:
      handle.close()
  return params, config


# ---------------------------------------------------------------------------
# T5X
# ---------------------------------------------------------------------------


def _flatten(tree: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
  flat = {}
  for k, v in tree.items():
    name = f'{prefix}{k}'
    if isinstance(v, Mapping):
      flat.update(_flatten(v, name + '/'))
    else:
      flat[name] = v
  return flat


def _t5x_key_normaliser(keys: Sequence[str]) -> Callable[[str], str]:
  """Maps the key variants of T5X trees onto 'target/...' names."""
  # Legacy T5X msgpack files nest everything under 'optimizer/'; a tree saved
  # as just the model params has no 'target/' root.
  strip = 'optimizer/' if keys and all(
      k.startswith('optimizer/') for k in keys) else ''
  stripped = [k[len(strip):] for k in keys]
  add = '' if any(k.startswith('target/') for k in stripped) else 'target/'
  return lambda k: add + k[len(strip):]


def _normalise_t5x_keys(flat: Mapping[str, Any]) -> dict[str, Any]:
  normalise = _t5x_key_normaliser(list(flat))
  return {normalise(k): v for k, v in flat.items()}


def _read_t5x_source(source: Any) -> tuple[str, dict[str, Any]]:
  """Returns (description, flat '/'-keyed dict of arrays)."""
  if isinstance(source, Mapping):
    return '<dict>', _flatten(source)
  path = os.fspath(source)
  if storage.isdir(path):
    return path, _flatten(_restore_orbax(path))  # Orbax reads gs:// itself
  if path.endswith('.npz'):
    with np.load(io.BytesIO(storage.read_bytes(path))) as data:
      return path, {k: data[k] for k in data.files}
  if path.endswith('.msgpack'):
    from flax import serialization  # pylint: disable=g-import-not-at-top
    return path, _flatten(serialization.msgpack_restore(storage.read_bytes(path)))
  raise ValueError(f'T5 checkpoint {path}: expected an Orbax folder, an .npz '
                   'or a .msgpack file')


def _restore_orbax(path: str) -> dict[str, Any]:
  """Restores the encoder-relevant leaves of an Orbax PyTree checkpoint."""
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  checkpointer = ocp.PyTreeCheckpointer()
  metadata = checkpointer.metadata(path)
  tree = getattr(metadata, 'item_metadata', metadata)
  tree = getattr(tree, 'tree', tree)
  # Skip optimizer state and the decoder: they can be larger than the encoder
  # and are never used. Unexpected-key checks still see every other leaf.
  flat = _flatten(tree)
  normalise = _t5x_key_normaliser(list(flat))
  wanted: dict[str, Any] = {}
  for key, leaf in flat.items():
    if normalise(key).startswith(_T5X_IGNORED_PREFIXES):
      continue
    node = wanted
    parts = key.split('/')
    for part in parts[:-1]:
      node = node.setdefault(part, {})
    node[parts[-1]] = leaf
  # numpy leaves: the host arrays do not depend on the devices or shardings
  # the checkpoint was written with.
  restore_args = jax.tree.map(
      lambda _: ocp.RestoreArgs(restore_type=np.ndarray), wanted)
  return checkpointer.restore(
      path, args=ocp.args.PyTreeRestore(
          item=wanted, restore_args=restore_args, partial_restore=True))


def _infer_t5x_config(shapes, source) -> t5.T5EncoderConfig:
  return _infer_config(
      shapes, ('target/token_embedder/embedding',),
      'target/encoder/relpos_bias/rel_embedding',
      'target/encoder/layers_0/attention/query/kernel',
      'target/encoder/layers_0/mlp/wi_0/kernel',
      _count_layers(shapes, 'target/encoder/layers_', '/'),
      torch_layout=False, source=source)


def load_t5x_params(source: Any,
                    config: Optional[t5.T5EncoderConfig] = None,
                    dtype: Any = np.float32
                    ) -> tuple[Params, t5.T5EncoderConfig]:
  """Loads a T5X encoder from a tree, an .npz/.msgpack file or Orbax folder.

  Args:
    source: nested dict or '/'-flattened dict of arrays (with or without the
      'target/' root), or a path to an .npz, a flax .msgpack, or an Orbax
      PyTree checkpoint folder.
    config: encoder sizes; inferred from the shapes when omitted (the number of
      buckets is inferred, the max distance is assumed to be T5's 128).
    dtype: numpy dtype of the returned parameters.

  Returns:
    (params, config).
  """
  description, flat = _read_t5x_source(source)
  flat = _normalise_t5x_keys(flat)
  shapes = {k: tuple(np.shape(v)) for k, v in flat.items()}
  if config is None:
    config = _infer_t5x_config(shapes, description)
  params = _map_checkpoint(description, shapes, lambda k: flat[k],
                           _t5x_table(config.num_layers),
                           _T5X_IGNORED_PREFIXES, config, dtype)
  return params, config


# ---------------------------------------------------------------------------
# Convenience
# ---------------------------------------------------------------------------


def load_t5_encoder(path: PathLike, dtype: Any = None, param_dtype: Any = None
                    ) -> tuple[t5.T5Encoder, Params,
                               text_tokenizers.TextTokenizer]:
  """Loads a Hugging Face T5 folder: module, params and tokenizer.

  The folder holds `*.safetensors`, usually `config.json`, and `spiece.model`
  (T5 / Flan-T5 / mT5). A folder without `spiece.model` whose vocabulary fits
  bytes (ByT5) gets a `ByteTokenizer`.

  Args:
    path: the model folder, local or gs://.
    dtype: compute dtype of the module (default float32).
    param_dtype: dtype of the returned parameters (default float32).

  Returns:
    (module, params, tokenizer).
  """
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  dtype = jnp.float32 if dtype is None else dtype
  param_dtype = jnp.float32 if param_dtype is None else param_dtype
  path = os.fspath(path)
  if not storage.isdir(path):
    raise NotADirectoryError(f'{path}: expected a Hugging Face model folder')
  params, config = load_hf_safetensors(path, dtype=np.dtype(param_dtype))
  spiece = storage.join(path, 'spiece.model')
  if storage.exists(spiece):
    tokenizer = text_tokenizers.SentencePieceTokenizer(spiece)
  elif text_tokenizers.ByteTokenizer().vocab_size <= config.vocab_size <= 384:
    tokenizer = text_tokenizers.ByteTokenizer()
  else:
    raise FileNotFoundError(
        f'{path}: no spiece.model for a vocabulary of {config.vocab_size}')
  if tokenizer.vocab_size > config.vocab_size:
    raise ValueError(f'{path}: tokenizer emits {tokenizer.vocab_size} ids but '
                     f'the embedding has only {config.vocab_size} rows')
  module = config.make_module(dtype=dtype, param_dtype=param_dtype)
  return module, params, tokenizer
