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
