"""The package's layering (docs/layout.md), read from every module's imports with ast.

  1 infrastructure and the config schema   sharding, placement, distributed, checkpointing, ...; config/
  2 what the rest is built from             models/, pretrained/, text/, data/, decoding algorithms
  3 artefacts and metrics                   train_state, tokenizer, generator, stories, eval metrics
  4 jobs, and the trainers' pieces          prepare, pretokenize, sample, eval_*; train/
  5 entry points                            main, preflight

An import may go down or sideways, never up; a job never imports another
job; only main.py, preflight.py (and tests) import train/ from outside it;
no module imports phenaki_jax inside a function (main.py dispatches through
its JOBS table with importlib). `python tests/layering_test.py PACKAGE_DIR`
prints the violations of any checkout.
"""
from __future__ import annotations

import ast
import os
import sys

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       "phenaki_jax")

INFRASTRUCTURE = {"sharding", "placement", "distributed", "checkpointing", "optimizers", "ema", "metrics",
                  "perf", "batch_log", "console", "storage", "safetensors_reader", "__init__"}
LAYER_3 = {"train_state", "tokenizer", "generator", "sampling.story", "sampling.start",
           "sampling.continuation"}
EVAL_JOBS = {"eval.eval_tokenizer", "eval.eval_generated", "eval.eval_compare",
             "eval.eval_prediction"}
JOBS = {"data.prepare", "data.pretokenize", "sampling.sample", "train.train_cvivit",
        "train.train_maskgit"} | EVAL_JOBS
ENTRY_POINTS = {"main", "preflight"}


def layer(module: str) -> int:
  """module: dotted name inside the package, e.g. 'data.pipeline'."""
  top = module.split(".")[0]
  if module in ENTRY_POINTS:
    return 5
  if module in JOBS or top == "train":
    return 4
  if module in LAYER_3 or top == "eval":
    return 3
  if top in ("models", "pretrained", "text", "data", "sampling"):
    return 2
  if top == "config" or module in INFRASTRUCTURE:
    return 1
  raise AssertionError(f"phenaki_jax.{module} has no layer: add it to tests/layering_test.py "
                       "and docs/layout.md")


def modules(package: str) -> dict[str, str]:
  """{dotted name: path} of every module in the package."""
  out = {}
  for root, _, files in os.walk(package):
    for name in files:
      if name.endswith(".py"):
        rel = os.path.relpath(os.path.join(root, name), package)[:-3].replace(os.sep, ".")
        out[rel.removesuffix(".__init__") if rel != "__init__" else rel] = os.path.join(root, name)
  return out


def _imported(node: ast.AST, known: dict[str, str]) -> list[str]:
  """Package modules an import statement names (a `from a import b` of a module is a.b)."""
  names = []
  if isinstance(node, ast.Import):
    names = [a.name for a in node.names]
  elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
    names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}"[12:] in known
             else node.module for a in node.names]
  return sorted({n[len("phenaki_jax."):] for n in names if n.startswith("phenaki_jax.")})


def violations(package: str = PACKAGE) -> list[str]:
  known = modules(package)
  found = []
  for module, path in sorted(known.items()):
    with open(path, encoding="utf-8") as f:
      tree = ast.parse(f.read(), path)
    inside_function = set()
    for fn in ast.walk(tree):
      if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
        inside_function.update(id(n) for n in ast.walk(fn) if n is not fn)
    for node in ast.walk(tree):
      for target in _imported(node, known):
        where = f"phenaki_jax/{module.replace('.', '/')}.py:{node.lineno}"
        if target not in known:
          found.append(f"{where} imports phenaki_jax.{target}, which does not exist")
          continue
        if id(node) in inside_function:
          found.append(f"{where} imports phenaki_jax.{target} inside a function")
        if layer(target) > layer(module):
          found.append(f"{where}: layer {layer(module)} module imports phenaki_jax.{target} "
                       f"(layer {layer(target)})")
        if module in JOBS and target in JOBS:
          found.append(f"{where}: job {module} imports job {target}")
        if target.split(".")[0] == "train" and not (
            module.startswith("train.") or module in ENTRY_POINTS):
          found.append(f"{where} imports phenaki_jax.{target}: only main.py, preflight.py and "
                       "tests import train/")
  return found


def test_every_module_has_a_layer():
  for module in modules(PACKAGE):
    layer(module)


def test_imports_follow_the_layers():
  assert not violations(), "\n".join(violations())


def test_the_checker_finds_an_upward_import(tmp_path):
  """A copy of two modules with one upward import is caught (the checker can fail)."""
  package = tmp_path / "phenaki_jax"
  (package / "train").mkdir(parents=True)
  (package / "__init__.py").write_text("")
  (package / "train" / "__init__.py").write_text("")
  (package / "train" / "train_cvivit.py").write_text("import jax\n")
  (package / "generator.py").write_text(
      "def load():\n  from phenaki_jax.train import train_cvivit\n  return train_cvivit\n")
  (package / "sharding.py").write_text("from phenaki_jax import generator\n")
  found = violations(str(package))
  assert any("generator.py:2 imports phenaki_jax.train.train_cvivit inside a function" in v
             for v in found), found
  assert any("generator.py:2: layer 3 module imports phenaki_jax.train.train_cvivit" in v
             for v in found), found
  assert any("only main.py, preflight.py and tests import train/" in v for v in found), found
  assert any("sharding.py:1: layer 1 module imports phenaki_jax.generator (layer 3)" in v
             for v in found), found


if __name__ == "__main__":
  for line in violations(sys.argv[1] if len(sys.argv) > 1 else PACKAGE):
    print(line)
