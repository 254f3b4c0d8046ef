"""Loads OpenAI CLIP / open_clip ViT weights into `clip.CLIP` parameters.

Sources (all in the open_clip / OpenAI state-dict naming: `visual.conv1.weight`,
`visual.transformer.resblocks.N.attn.in_proj_weight`, `token_embedding.weight`,
`text_projection`, `logit_scale`, ...):

* a torch checkpoint (`.pt`, `.pth`, `.bin`): a plain state dict, an
  open_clip training checkpoint (`{'state_dict': ...}`, with or without the
  DistributedDataParallel `module.` prefix), or an OpenAI TorchScript archive
  (the files `clip.load` downloads, e.g. `ViT-B-32.pt`). Needs torch, which is
  imported only here and only for these files;
* a `.safetensors` file with the same names (open_clip's
  `open_clip_model.safetensors`), read with `safetensors` alone;
* a folder holding one of those (open_clip Hugging Face layout);
* an in-memory mapping name -> array.

Files and folders may be local or on gs:// (storage.py): a remote
.safetensors is read tensor by tensor, a remote torch file is downloaded to a
temporary file first (torch needs a real file).

The architecture is inferred from the shapes, as OpenAI's `build_model` does;
the head count is not visible in any shape and is width // 64 for every
released ViT CLIP (pass `config=` otherwise). Whether the MLP uses QuickGELU
is not visible either: see `load_clip_params`.

Every problem is reported at once, each with its checkpoint name and the
file: missing, unexpected and mis-shaped tensors.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import re
import zipfile
from typing import Any, Callable, Mapping, Optional

import numpy as np

from phenaki_jax import safetensors_reader, storage
from phenaki_jax.pretrained import clip

PathLike = str | os.PathLike[str]
Params = dict[str, Any]

# Keys OpenAI's archives carry as plain numbers (build_model deletes them) and
# buffers that are not weights.
_METADATA_KEYS = ('input_resolution', 'context_length', 'vocab_size')
_IGNORED_SUFFIXES = ('attn_mask',)
# open_clip's Hugging Face folders use these names, in this order of
# preference.
_FOLDER_FILES = ('open_clip_model.safetensors', 'model.safetensors',
                 'open_clip_pytorch_model.bin', 'pytorch_model.bin')
_HEAD_WIDTH = 64


@dataclasses.dataclass(frozen=True)
class _Conv:
  """A checkpoint-array -> parameter conversion and its inverse."""
  to_ours: Callable[[np.ndarray], np.ndarray]
  to_ckpt: Callable[[np.ndarray], np.ndarray]


_SAME = _Conv(lambda a: a, lambda a: a)
# torch Linear weight (out, in) <-> kernel (in, out).
_LINEAR = _Conv(lambda a: a.T, lambda a: a.T)
# torch conv weight (width, 3, p, p) <-> kernel (p, p, 3, width).
_PATCH_CONV = _Conv(lambda a: a.transpose(2, 3, 1, 0),
                    lambda a: a.transpose(3, 2, 0, 1))


@dataclasses.dataclass(frozen=True)
class _Entry:
  """Checkpoint key, its shape, and the (our path, conversion)s it feeds.

  `split` > 1 cuts the (torch-layout) tensor into equal row blocks first:
  in_proj_weight / in_proj_bias hold q, k, v stacked.
  """
  key: str
  shape: tuple[int, ...]
  targets: tuple[tuple[tuple[str, ...], _Conv], ...]
  split: int = 1


def _block_entries(prefix: str, ours: tuple[str, ...], width: int,
                   heads: int, mlp: int) -> list[_Entry]:
  hd = width // heads
  # (width_out, width_in) rows of q/k/v <-> kernel (in, heads, head_dim).
  heads_kernel = _Conv(lambda a: a.T.reshape(width, heads, hd),
                       lambda a: a.reshape(width, width).T)
  heads_bias = _Conv(lambda a: a.reshape(heads, hd),
                     lambda a: a.reshape(width))
  # out_proj (width_out, width_in) <-> kernel (heads, head_dim, out).
  out_kernel = _Conv(lambda a: a.T.reshape(heads, hd, width),
                     lambda a: a.reshape(width, width).T)

  def ln(name):
    return [_Entry(f'{prefix}.{name}.weight', (width,),
                   ((ours + (name, 'scale'), _SAME),)),
            _Entry(f'{prefix}.{name}.bias', (width,),
                   ((ours + (name, 'bias'), _SAME),))]

  attn = ours + ('attn',)
  qkv = ('query', 'key', 'value')
  return [
      *ln('ln_1'),
      _Entry(f'{prefix}.attn.in_proj_weight', (3 * width, width),
             tuple((attn + (n, 'kernel'), heads_kernel) for n in qkv), 3),
      _Entry(f'{prefix}.attn.in_proj_bias', (3 * width,),
             tuple((attn + (n, 'bias'), heads_bias) for n in qkv), 3),
      _Entry(f'{prefix}.attn.out_proj.weight', (width, width),
             ((attn + ('out', 'kernel'), out_kernel),)),
      _Entry(f'{prefix}.attn.out_proj.bias', (width,),
             ((attn + ('out', 'bias'), _SAME),)),
      *ln('ln_2'),
      _Entry(f'{prefix}.mlp.c_fc.weight', (mlp, width),
             ((ours + ('mlp', 'c_fc', 'kernel'), _LINEAR),)),
      _Entry(f'{prefix}.mlp.c_fc.bias', (mlp,),
             ((ours + ('mlp', 'c_fc', 'bias'), _SAME),)),
      _Entry(f'{prefix}.mlp.c_proj.weight', (width, mlp),
             ((ours + ('mlp', 'c_proj', 'kernel'), _LINEAR),)),
      _Entry(f'{prefix}.mlp.c_proj.bias', (width,),
             ((ours + ('mlp', 'c_proj', 'bias'), _SAME),)),
  ]


def _table(config: clip.CLIPConfig) -> list[_Entry]:
  """Every checkpoint tensor of a ViT CLIP with these sizes."""
  c = config
  vw, tw, p = c.vision_width, c.text_width, c.patch_size

  def one(key, shape, path, conv=_SAME):
    return _Entry(key, shape, ((path, conv),))

  def ln(key, path, width):
    return [one(f'{key}.weight', (width,), path + ('scale',)),
            one(f'{key}.bias', (width,), path + ('bias',))]

  table = [
      one('visual.conv1.weight', (vw, 3, p, p), ('visual', 'conv1',
                                                  'kernel'), _PATCH_CONV),
      one('visual.class_embedding', (vw,), ('visual', 'class_embedding')),
      one('visual.positional_embedding', (c.grid_size ** 2 + 1, vw),
          ('visual', 'positional_embedding')),
      *ln('visual.ln_pre', ('visual', 'ln_pre'), vw),
      *ln('visual.ln_post', ('visual', 'ln_post'), vw),
      one('visual.proj', (vw, c.embed_dim), ('visual', 'proj')),
      one('token_embedding.weight', (c.vocab_size, tw),
          ('text', 'token_embedding')),
      one('positional_embedding', (c.context_length, tw),
          ('text', 'positional_embedding')),
      *ln('ln_final', ('text', 'ln_final'), tw),
      one('text_projection', (tw, c.embed_dim), ('text', 'text_projection')),
      one('logit_scale', (), ('logit_scale',)),
  ]
  for i in range(c.vision_layers):
    table += _block_entries(
        f'visual.transformer.resblocks.{i}',
        ('visual', 'transformer', f'resblocks_{i}'), vw, c.vision_heads,
        c.vision_mlp_dim)
  for i in range(c.text_layers):
    table += _block_entries(
        f'transformer.resblocks.{i}', ('text', 'transformer', f'resblocks_{i}'),
        tw, c.text_heads, c.text_mlp_dim)
  return table


def _flat_shapes(tree: Mapping[str, Any], prefix=()) -> dict[tuple[str, ...],
                                                            tuple[int, ...]]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(_flat_shapes(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = tuple(np.shape(v))
  return out


# ---------------------------------------------------------------------------
# Architecture from shapes
# ---------------------------------------------------------------------------


def _count_blocks(shapes: Mapping[str, Any], prefix: str) -> int:
  pattern = re.compile(re.escape(prefix) + r'(\d+)\.')
  ids = {int(m.group(1)) for k in shapes if (m := pattern.match(k))}
  return max(ids) + 1 if ids else 0


def _heads(width: int, tower: str, source: str) -> int:
  if width % _HEAD_WIDTH:
    raise ValueError(
        f'CLIP checkpoint {source}: {tower} width {width} is not a multiple of '
        f'{_HEAD_WIDTH}, so the head count cannot be inferred; pass config=')
  return width // _HEAD_WIDTH


def infer_config(shapes: Mapping[str, tuple[int, ...]], quick_gelu: bool,
                 source: str = '<state dict>') -> clip.CLIPConfig:
  """Sizes of a ViT CLIP from its tensor shapes (OpenAI build_model's rules)."""
  if any(k.startswith('visual.layer1.') for k in shapes):
    raise NotImplementedError(
        f'CLIP checkpoint {source}: a ModifiedResNet image tower (RN50, ...); '
        'only ViT CLIP models are supported')
  if any(k.startswith('visual.trunk.') for k in shapes):
    raise NotImplementedError(
        f'CLIP checkpoint {source}: a timm image tower (visual.trunk.*); '
        'only the OpenAI-style ViT tower is supported')
  needed = ('visual.conv1.weight', 'visual.positional_embedding',
            'token_embedding.weight', 'positional_embedding', 'text_projection',
            'visual.transformer.resblocks.0.mlp.c_fc.weight',
            'transformer.resblocks.0.mlp.c_fc.weight')
  absent = [k for k in needed if k not in shapes]
  if absent:
    raise ValueError(f'CLIP checkpoint {source}: cannot infer the '
                     f'architecture, missing {", ".join(absent)}')
  vision_width, _, patch, _ = shapes['visual.conv1.weight']
  grid = round((shapes['visual.positional_embedding'][0] - 1) ** 0.5)
  vocab_size, text_width = shapes['token_embedding.weight']
  return clip.CLIPConfig(
      embed_dim=shapes['text_projection'][1],
      image_size=patch * grid,
      patch_size=patch,
      vision_width=vision_width,
      vision_layers=_count_blocks(shapes, 'visual.transformer.resblocks.'),
      vision_heads=_heads(vision_width, 'vision', source),
      vision_mlp_dim=shapes['visual.transformer.resblocks.0.mlp.c_fc.weight'][
          0],
      context_length=shapes['positional_embedding'][0],
      vocab_size=vocab_size,
      text_width=text_width,
      text_layers=_count_blocks(shapes, 'transformer.resblocks.'),
      text_heads=_heads(text_width, 'text', source),
      text_mlp_dim=shapes['transformer.resblocks.0.mlp.c_fc.weight'][0],
      quick_gelu=quick_gelu)


# ---------------------------------------------------------------------------
# State dict <-> params
# ---------------------------------------------------------------------------


def _check_metadata(read: Callable[[str], Any], keys, config: clip.CLIPConfig,
                    source: str) -> list[str]:
  """OpenAI's number keys must agree with the weights when present."""
  want = {'input_resolution': config.image_size,
          'context_length': config.context_length,
          'vocab_size': config.vocab_size}
  problems = []
  for key in _METADATA_KEYS:
    if key in keys:
      got = int(np.asarray(read(key)))
      if got != want[key]:
        problems.append(f'{key}: checkpoint {got} vs weights {want[key]}')
  return problems


def state_dict_to_params(state: Mapping[str, Any],
                         config: Optional[clip.CLIPConfig] = None,
                         quick_gelu: bool = True,
                         dtype: Any = np.float32,
                         source: str = '<state dict>',
                         read: Optional[Callable[[str], Any]] = None,
                         ) -> tuple[Params, clip.CLIPConfig]:
  """Maps an open_clip / OpenAI state dict (name -> array) to our params.

  Args:
    state: name -> array (numpy, or anything `np.asarray` takes); when `read`
      is given only its keys and shapes are used (values read lazily).
    config: sizes to check against; inferred from the shapes when omitted.
    quick_gelu: the MLP activation of an inferred config.
    dtype: numpy dtype of the returned parameters.
    source: the file, for error messages.
    read: optional key -> array reader (lazy file access).

  Returns:
    (params, config): a nested dict of numpy arrays for
    `config.make_module().apply({'params': params}, ...)`.
  """
  shapes = {k: tuple(np.shape(v)) for k, v in state.items()}
  read = read or (lambda k: state[k])
  return _map(shapes, read, config, quick_gelu, dtype, source)


def _map(shapes: Mapping[str, tuple[int, ...]], read: Callable[[str], Any],
         config: Optional[clip.CLIPConfig], quick_gelu: bool, dtype: Any,
         source: str) -> tuple[Params, clip.CLIPConfig]:
  if config is None:
    config = infer_config(shapes, quick_gelu, source)
  table = _table(config)
  _check_table(table, config)

  missing, mismatched = [], []
  for entry in table:
    if entry.key not in shapes:
      missing.append(entry.key)
    elif tuple(shapes[entry.key]) != entry.shape:
      mismatched.append(f'{entry.key}: checkpoint {tuple(shapes[entry.key])} '
                        f'vs model {entry.shape}')
  known = {e.key for e in table} | set(_METADATA_KEYS)
  unexpected = sorted(k for k in shapes
                      if k not in known and not k.endswith(_IGNORED_SUFFIXES))
  problems = []
  if missing:
    problems.append('missing ' + ', '.join(missing))
  if unexpected:
    problems.append('unexpected ' + ', '.join(unexpected))
  if mismatched:
    problems.append('shape mismatch ' + ', '.join(mismatched))
  if not missing and not mismatched:
    bad_meta = _check_metadata(read, shapes, config, source)
    if bad_meta:
      problems.append('metadata mismatch ' + ', '.join(bad_meta))
  if problems:
    raise ValueError(f'CLIP checkpoint {source}: ' + '; '.join(problems))

  params: Params = {}
  for entry in table:
    array = _to_numpy(read(entry.key))
    parts = np.split(array, entry.split, axis=0) if entry.split > 1 else [
        array]
    for part, (path, conv) in zip(parts, entry.targets):
      node = params
      for name in path[:-1]:
        node = node.setdefault(name, {})
      node[path[-1]] = np.array(conv.to_ours(part), dtype=dtype, order="C")
  return params, config


def _check_table(table: list[_Entry], config: clip.CLIPConfig) -> None:
  """The table must produce exactly the module's parameters (our bug if not)."""
  ours = set(_flat_shapes(clip.param_shapes(config.make_module())))
  produced = {path for e in table for path, _ in e.targets}
  if ours != produced:
    raise AssertionError(f'CLIP mapping table out of sync with the module: '
                         f'{sorted(ours ^ produced)}')


def params_to_state_dict(params: Mapping[str, Any], config: clip.CLIPConfig,
                         dtype: Any = np.float32) -> dict[str, np.ndarray]:
  """Our params -> an open_clip-layout state dict (numpy), the inverse map.

  For exporting a model to open_clip / safetensors, and for tests that need a
  checkpoint file without torch.
  """
  flat = {}

  def walk(tree, prefix):
    for k, v in tree.items():
      if isinstance(v, Mapping):
        walk(v, prefix + (k,))
      else:
        flat[prefix + (k,)] = np.asarray(v, np.float32)

  walk(params, ())
  state = {}
  for entry in _table(config):
    parts = [conv.to_ckpt(flat[path]) for path, conv in entry.targets]
    array = np.concatenate(parts, axis=0) if entry.split > 1 else parts[0]
    assert array.shape == entry.shape, (entry.key, array.shape, entry.shape)
    state[entry.key] = np.array(array, dtype=dtype, order="C")
  return state


# ---------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------


def _to_numpy(value: Any) -> np.ndarray:
  """numpy float32/int from numpy, torch (any dtype, incl. bf16) or jax."""
  if hasattr(value, 'detach'):  # torch tensor: numpy has no bfloat16
    value = value.detach().cpu()
    if value.is_floating_point():
      value = value.float()
    return value.numpy()
  array = np.asarray(value)
  if array.dtype.kind == 'f' or array.dtype.name == 'bfloat16':
    array = array.astype(np.float32)
  return array


def _import_torch(path: str):
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        f'CLIP checkpoint {path}: reading a torch checkpoint needs PyTorch, '
        'which phenaki_jax does not install (it is a test extra). Install '
        'torch (CPU is enough), or convert the file once to .safetensors with '
        'the same key names and load that.') from e
  return torch


def _is_torchscript(path: str) -> bool:
  """TorchScript archives are zips with a code/ folder and constants.pkl."""
  if not zipfile.is_zipfile(path):
    return False
  with zipfile.ZipFile(path) as z:
    names = z.namelist()
  return any(n.endswith('/constants.pkl') or '/code/' in n for n in names)


def _read_torch(path: str) -> dict[str, Any]:
  torch = _import_torch(path)
  with storage.local_copy(path) as local:
    return _read_local_torch(torch, local, path)


def _read_local_torch(torch, local: str, path: str) -> dict[str, Any]:
  """The state dict of the torch file `local` (a copy of `path`, the name in errors)."""
  if _is_torchscript(local):
    # OpenAI's released files are TorchScript archives; their state dict
    # holds the weights (fp16) under the usual names plus number keys.
    try:
      archive = torch.jit.load(local, map_location='cpu')
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(
          f'CLIP checkpoint {path}: cannot load this TorchScript archive '
          f'({e}); re-save its weights as a state dict, e.g. '
          "torch.save(torch.jit.load(path).state_dict(), 'clip.pt')") from e
    state = archive.state_dict()
  else:
    # weights_only: a checkpoint is data; never unpickle arbitrary objects.
    state = torch.load(local, map_location='cpu', weights_only=True)
  if isinstance(state, Mapping) and 'state_dict' in state and isinstance(
      state['state_dict'], Mapping):
    state = state['state_dict']  # open_clip training checkpoint
  if not isinstance(state, Mapping):
    raise ValueError(f'CLIP checkpoint {path}: expected a state dict, got '
                     f'{type(state).__name__}')
  if state and all(k.startswith('module.') for k in state):
    state = {k[len('module.'):]: v for k, v in state.items()}
  return dict(state)


def _resolve(path: PathLike) -> str:
  path = os.fspath(path)
  if storage.isdir(path):
    for name in _FOLDER_FILES:
      if storage.exists(storage.join(path, name)):
        return storage.join(path, name)
    raise FileNotFoundError(
        f'{path}: no CLIP weights in this folder (looked for '
        f'{", ".join(_FOLDER_FILES)})')
  if not storage.exists(path):
    raise FileNotFoundError(f'CLIP checkpoint {path} does not exist')
  return path


def _sidecar_quick_gelu(path: str) -> Optional[bool]:
  """quick_gelu from an open_clip_config.json next to the weights, if any."""
  config_json = storage.join(storage.dirname(path), 'open_clip_config.json')
  if not storage.exists(config_json):
    return None
  model_cfg = storage.read_json(config_json).get('model_cfg', {})
  # open_clip's default (a config without the key) is nn.GELU.
  return bool(model_cfg.get('quick_gelu', False))


def load_clip_params(path: PathLike,
                     config: Optional[clip.CLIPConfig] = None,
                     quick_gelu: Optional[bool] = None,
                     dtype: Any = np.float32
                     ) -> tuple[Params, clip.CLIPConfig]:
  """Loads ViT CLIP weights from a torch / safetensors file or a folder.

  Args:
    path: a `.safetensors` file, a torch file (`.pt`/`.pth`/`.bin`: state
      dict, open_clip training checkpoint or OpenAI TorchScript archive), or a
      folder with `open_clip_model.safetensors` / `open_clip_pytorch_model.bin`.
    config: sizes to check against; inferred from the shapes when omitted.
    quick_gelu: the MLP activation, which no weight shape shows. When None:
      the `quick_gelu` of an `open_clip_config.json` beside the weights if
      there is one (open_clip's own default there is GELU), else True, the
      activation of OpenAI's released models and their open_clip copies (the
      usual CLIP-score models). Pass False for LAION/DataComp models trained
      with nn.GELU. Ignored when `config` is given.
    dtype: numpy dtype of the returned parameters.

  Returns:
    (params, config).
  """
  file = _resolve(path)
  if quick_gelu is None:
    quick_gelu = _sidecar_quick_gelu(file)
    if quick_gelu is None:
      quick_gelu = True
      logging.info('CLIP checkpoint %s: assuming QuickGELU (OpenAI weights)',
                   file)
  if file.endswith('.safetensors'):
    try:
      import safetensors  # pylint: disable=g-import-not-at-top,unused-import
    except ImportError as e:
      raise ImportError(f'CLIP checkpoint {file}: reading .safetensors needs '
                        '`safetensors` (pip install safetensors)') from e
    # bfloat16 tensors come back as ml_dtypes arrays; _to_numpy widens them.
    with safetensors_reader.SafetensorsReader(file) as handle:
      shapes = {k: handle.shape(k) for k in handle.keys()}
      return _map(shapes, handle.get_tensor, config, quick_gelu, dtype, file)
  state = _read_torch(file)
  return state_dict_to_params(state, config, quick_gelu, dtype, file)


def save_safetensors(params: Mapping[str, Any], config: clip.CLIPConfig,
                     path: PathLike) -> None:
  """Writes params as an open_clip-layout .safetensors file."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  save_file(params_to_state_dict(params, config), os.fspath(path))
