"""The one grammar of a config file's argument: `--config=configs/JOB.py:ARG`.

In the spirit of big_vision's `configs/common.py` parse_arg. A config file
declares its parameters and reads them by name:

  arg = args.parse_arg(arg, "configs/cvivit.py",
                       variant=args.OneOf("default", "tiny", "paper"), l2vq=False)
  if arg.variant == "tiny": ...

ARG is comma-separated items, each one of
  WORD        a value of the next positional (OneOf) parameter, in declaration
              order ('tiny'; 'gpu,maskgit' for two), or the name of a boolean
              parameter, which it sets ('tiny,l2vq');
  NAME=VALUE  any parameter by name, converted to its default's type
              (booleans strictly: true / false).
'' (or no argument) leaves every parameter at its default.
"""
from __future__ import annotations

from typing import Any

import ml_collections


class OneOf:
  """A positional parameter: one of `choices`, by default the first."""

  def __init__(self, *choices: str):
    self.choices = tuple(choices)


def _shown(choices: tuple[str, ...]) -> str:
  # 'default' is what an empty argument means, so it is listed as ''.
  return ", ".join("''" if c == "default" else repr(c) for c in choices)


def _strict_bool(text: str) -> bool:
  if text.lower() not in ("true", "false"):
    raise ValueError(f"{text!r} is not true or false")
  return text.lower() == "true"


def _convert(where: str, name: str, default: Any, text: str) -> Any:
  if isinstance(default, OneOf):
    if text not in default.choices:
      raise ValueError(f"{where}: unknown {name} {text!r}; choose one of "
                       f"{_shown(default.choices)}")
    return text
  try:
    return _strict_bool(text) if isinstance(default, bool) else type(default)(text)
  except ValueError as e:
    raise ValueError(f"{where}: {name}={text!r}: {e}") from None


def parse_arg(arg: str | None, where: str, **spec: Any) -> ml_collections.ConfigDict:
  """Parses ARG against `spec` (name: default, or OneOf(...) for a positional).

  Args:
    arg: the string after ':' in --config=FILE:ARG ('' or None: all defaults).
    where: the config file, for messages ('configs/cvivit.py').
    **spec: the parameters in order; a bool's bare name sets it (a modifier).

  Returns:
    A ConfigDict of every parameter's value.
  """
  values = {k: (v.choices[0] if isinstance(v, OneOf) else v) for k, v in spec.items()}
  positional = [k for k, v in spec.items() if isinstance(v, OneOf)]
  modifiers = [k for k, v in spec.items() if isinstance(v, bool)]
  for item in (arg or "").split(","):
    if not item:
      continue
    name, eq, text = item.partition("=")
    if eq:
      if name not in spec:
        raise ValueError(f"{where}: unknown parameter {name!r} in {arg!r}; the parameters "
                         f"are {', '.join(map(repr, spec))}")
      values[name] = _convert(where, name, spec[name], text)
      if name in positional:
        positional.remove(name)
    elif item in modifiers:
      values[item] = True
    elif positional:
      name = positional.pop(0)
      values[name] = _convert(where, name, spec[name], item)
    elif any(isinstance(v, OneOf) and item in v.choices for v in spec.values()):
      name = next(k for k, v in spec.items() if isinstance(v, OneOf) and item in v.choices)
      raise ValueError(f"{where}: {name} given twice in {arg!r}")
    elif modifiers:
      example = next((k for k, v in spec.items() if isinstance(v, OneOf)), None)
      if example:
        choices = spec[example].choices
        example = f"'{choices[min(1, len(choices) - 1)]},{modifiers[0]}'"
      else:
        example = repr(modifiers[0])
      which = (f"the one modifier is {modifiers[0]!r}" if len(modifiers) == 1 else
               f"the modifiers are {', '.join(map(repr, modifiers))}")
      raise ValueError(f"{where}: unknown modifier {item!r} in {arg!r}; {which} "
                       f"(e.g. {example})")
    else:
      raise ValueError(f"{where}: unexpected {item!r} in {arg!r}; {where} takes no modifiers")
  return ml_collections.ConfigDict(values)
