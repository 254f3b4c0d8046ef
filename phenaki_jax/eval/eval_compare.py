"""Several eval_generated reports side by side (configs/eval.py:compare), job 'eval_compare'.

  python -m phenaki_jax.main --config=configs/eval.py:compare --workdir=OUT \
      --config.reports=runs/eval_a/report.json,gs://bucket/eval_b/report.json

Prints a markdown table (a row per metric, a column per report) and writes
OUT/comparison.md and OUT/comparison.json. FVD is comparable only under one
protocol against one reference set, so every protocol field (as configured and
as resolved) and the reference set are compared across the reports, and each
field that differs is named in a warning, in the log, the table's notes and
the JSON.
"""
from __future__ import annotations

import json
from typing import Any

import ml_collections
from absl import logging

from phenaki_jax import storage
from phenaki_jax.config import schema
from phenaki_jax.config.schema import ConfigError
from phenaki_jax.eval import report as report_lib

# Rows first in this order, then any other metric alphabetically.
_FIRST = ("fvd", "fvd_std", "fvd_clips", "shapes/all", "shapes/colour", "shapes/shape",
          "shapes/size", "shapes/motion", "clip_score", "clip_cosine")
# Reference fields that must match for FVDs to be comparable.
_REFERENCE_FIELDS = ("kind", "path", "seed", "split", "resolution")


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
  if not isinstance(d, dict):
    return {prefix: d}
  out = {}
  for k, v in d.items():
    out.update(_flatten(v, f"{prefix}{k}." if isinstance(v, dict) else f"{prefix}{k}"))
  return out


def protocol_differences(reports: list[dict[str, Any]]) -> list[str]:
  """Names of the protocol fields (and reference fields) whose values differ."""
  flats = [_flatten(r.get("protocol", {}), "protocol.") for r in reports]
  flats = [{**f, **{f"reference.{k}": r.get("reference", {}).get(k)
                    for k in _REFERENCE_FIELDS}} for f, r in zip(flats, reports)]
  keys = sorted(set().union(*flats))
  return [k for k in keys if len({json.dumps(f.get(k), sort_keys=True) for f in flats}) > 1]


def validate(config: ml_collections.ConfigDict) -> list[str]:
  paths = [p.strip() for p in config.reports.split(",") if p.strip()]
  if len(paths) < 2:
    raise ConfigError(f"config.reports={config.reports!r}: give at least two report.json "
                      "paths, comma-separated")
  for path in paths:
    if not storage.isfile(path):
      raise ConfigError(f"config.reports: {path!r}: no such file")
  names = [n.strip() for n in config.names.split(",")] if config.names else []
  if names and len(names) != len(paths):
    raise ConfigError(f"config.names={config.names!r}: {len(names)} names for "
                      f"{len(paths)} reports")
  return paths


def _load(path: str) -> dict[str, Any]:
  try:
    report = storage.read_json(path)
  except (OSError, ValueError) as e:
    raise ConfigError(f"config.reports: {path!r}: cannot read it as JSON: {e}") from None
  if report.get("job") != "eval_generated":
    raise ConfigError(f"config.reports: {path!r} is not an eval_generated report "
                      f"(job={report.get('job')!r})")
  return report


def table(names: list[str], reports: list[dict[str, Any]], differences: list[str]) -> str:
  keys = set().union(*(r["metrics"] for r in reports))
  rows = [k for k in _FIRST if k in keys] + sorted(keys - set(_FIRST))
  lines = ["| metric | " + " | ".join(names) + " |",
           "|---|" + "---|" * len(names)]
  for k in rows:
    lines.append(f"| {k} | " + " | ".join(report_lib._fmt(r["metrics"].get(k))  # pylint: disable=protected-access
                                          for r in reports) + " |")
  lines.append("| clips (generated / reference) | " + " | ".join(
      f"{r['generated'].get('clips')} / {r['reference'].get('clips')}" for r in reports) + " |")
  lines.append("| skipped files | " + " | ".join(str(len(r.get("skipped", [])))
                                                 for r in reports) + " |")
  lines.append("")
  if differences:
    lines.append("**Warning: the protocols differ, so FVDs are not comparable**; differing "
                 "fields: " + ", ".join(f"`{d}`" for d in differences))
  else:
    lines.append("Same protocol and reference set in every report.")
  return "\n".join(lines) + "\n"


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  config = schema.complete(config)
  paths = validate(config)
  reports = [_load(p) for p in paths]
  names = ([n.strip() for n in config.names.split(",")] if config.names
           else [r.get("name") or storage.basename(storage.dirname(storage.absolute(p)))
                 for r, p in zip(reports, paths)])
  differences = protocol_differences(reports)
  if differences:
    logging.warning("the reports' protocols differ (FVDs not comparable) in: %s",
                    ", ".join(differences))
  markdown = table(names, reports, differences)
  print(markdown)
  result = {
      "job": "eval_compare",
      "reports": [{"name": n, "path": storage.absolute(p), "metrics": r["metrics"],
                   "protocol": r.get("protocol"), "reference": r.get("reference")}
                  for n, p, r in zip(names, paths, reports)],
      "protocol_differences": differences,
      "warnings": ([f"protocols differ in: {', '.join(differences)}"] if differences else []),
  }
  storage.makedirs(workdir)
  storage.write_text(storage.join(workdir, "comparison.md"), markdown)
  report_lib.write_json(storage.join(workdir, "comparison.json"), result)
  logging.info("compared %d reports -> %s", len(reports), storage.join(workdir, "comparison.md"))
  return {**result, "markdown": markdown}
