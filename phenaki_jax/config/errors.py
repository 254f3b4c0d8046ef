"""ConfigError and the small checks every section uses.

A check names the key and the value it rejects, and says what would be right:
`config.input.batch_size=6: must be divisible by the 4 ways ...`.
"""
from __future__ import annotations

from typing import Any, Iterable

import jax.numpy as jnp
import ml_collections


class ConfigError(ValueError):
  """A config key or value the trainer cannot use."""


def flat_keys(cfg: ml_collections.ConfigDict, prefix: str = "") -> dict[str, Any]:
  """{'model.width': 128, ...}: every leaf of `cfg` by its dotted key."""
  out = {}
  for k, v in cfg.items():
    key = f"{prefix}{k}"
    if isinstance(v, ml_collections.ConfigDict):
      out.update(flat_keys(v, key + "."))
    else:
      out[key] = v
  return out


def set_key(cfg: ml_collections.ConfigDict, dotted: str, value: Any) -> None:
  """cfg['a']['b'] = value for dotted='a.b'."""
  *parents, leaf = dotted.split(".")
  for p in parents:
    cfg = cfg[p]
  cfg[leaf] = value


def require(ok: bool, key: str, value: Any, why: str) -> None:
  """Raises `config.KEY=VALUE: WHY` unless ok."""
  if not ok:
    raise ConfigError(f"config.{key}={value!r}: {why}")


def positive_ints(config: ml_collections.ConfigDict, keys: Iterable[str]) -> None:
  """Each dotted key holds an int > 0 (not a bool)."""
  flat = flat_keys(config)
  for k in keys:
    v = flat[k]
    require(isinstance(v, int) and not isinstance(v, bool) and v > 0, k, v,
            "must be a positive integer")


def check_dtype(config: ml_collections.ConfigDict, key: str) -> None:
  """The dotted key names a dtype jnp knows."""
  value = flat_keys(config)[key]
  try:
    jnp.dtype(value)
  except TypeError:
    raise ConfigError(f"config.{key}={value!r}: not a dtype name (e.g. 'float32', 'bfloat16')")
