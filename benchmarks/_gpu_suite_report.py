"""Reads gpu_suite.sh's results.jsonl; prints and writes each figure against issue 11's target.

  python benchmarks/_gpu_suite_report.py DIR/results.jsonl [--out=DIR/summary.json]

Targets (issue 11, one H100): generator train step >= 40% MFU at ~300M
parameters; tokenizer train step >= 1,500 frames/s at 128x128 with the full
objective; one 11-frame 128x128 clip in 12 guided steps <= 150 ms; phenaki_jax
>= 3x phenaki-pytorch (fastest mixed-precision mode) per train step. Imports no
JAX: it runs anywhere.
"""
from __future__ import annotations

import argparse
import json
import sys

R1_EVERY = 4  # configs/cvivit.py:paper's gan.r1_every (the default): 1 step in 4 adds R1


def _note(make) -> str:
  """make() -> text, or '' where the result lacks a field (a dry run, a failed run)."""
  try:
    return make() or ""
  except (KeyError, TypeError, ZeroDivisionError):
    return ""


def _get(result, key):
  value = (result or {}).get(key)
  return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def figures(rows: dict[str, dict]) -> list[dict]:
  out = []

  def add(name, value, target, unit, higher_is_better=True, note=""):
    meets = None if value is None else (value >= target if higher_is_better else value <= target)
    out.append({"figure": name, "value": value, "target": target, "unit": unit,
                "meets_target": meets, "note": note})

  def result(name):
    row = rows.get(name) or {}
    return row.get("result") if row.get("rc") == 0 else None

  g = result("generator_train_step")
  add("generator train step MFU (~300M)", _get(g, "mfu"), 0.40, "fraction",
      note=_note(lambda: f"{g['params'] / 1e6:.0f}M params, {g['step_s_median'] * 1e3:.1f} "
                 f"ms/step, {g['tokens_per_s']:.0f} tokens/s"))
  s = result("sampling")
  for kind, label in (("guided+decode", "clip 11x128x128, 12 guided steps + decode"),
                      ("guided", "tokens only, 12 guided steps")):
    p50 = None
    for r in (s or {}).get("results", []):
      if r.get("guidance") == kind and r.get("batch") == 1 and r.get("steps") == 12:
        p50 = r.get("p50_s")
    add(f"sampling latency, {label}", p50, 0.150, "s", higher_is_better=False)
  b = result("side_by_side")
  for job in ("cvivit", "maskgit"):
    add(f"side-by-side {job}: phenaki-pytorch step / ours", _get(b, f"{job}_speedup"), 3.0, "x",
        note=_note(lambda: f"ours {b[f'{job}_step_s'] * 1e3:.1f} ms, phenaki-pytorch "
                   f"{b[f'phenaki_pytorch_{job}_step_s'] * 1e3:.1f} ms "
                   f"({b['settings'].get('torch')})"))
  t, r1 = result("tokenizer_full"), result("tokenizer_full_r1")
  add("tokenizer full objective, GAN 'on' step (3 in 4)", _get(t, "frames_per_s"), 1500.0,
      "frames/s", note=_note(lambda: f"frozen weights {t['frozen_weights']}, "
                             f"{t['step_s_median'] * 1e3:.1f} ms/step"))
  if _get(t, "step_s_median") and _get(r1, "step_s_median"):
    frames = t["frames_per_s"] * t["step_s_median"]
    mean_step = ((R1_EVERY - 1) * t["step_s_median"] + r1["step_s_median"]) / R1_EVERY
    add("tokenizer full objective, average with lazy R1", frames / mean_step, 1500.0, "frames/s")
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("results")
  parser.add_argument("--out", default="")
  parser.add_argument("--not_comparable", default="",
                      help="a reason the figures are not to be held against the targets "
                      "(gpu_suite.sh --smoke: tiny sizes on a CPU)")
  args = parser.parse_args()
  rows = {}
  with open(args.results) as f:
    for line in f:
      if line.strip():
        row = json.loads(line)
        rows[row["name"]] = row
  device = next((r["result"].get("device") for r in rows.values()
                 if r.get("result") and r["result"].get("device")), None)
  summary = {"device": device,
             "runs": {n: {k: r.get(k) for k in ("rc", "seconds", "timed_out", "skipped")}
                      for n, r in rows.items()},
             "figures": figures(rows)}
  if args.not_comparable:
    summary["not_comparable"] = args.not_comparable
    for fig in summary["figures"]:
      fig["meets_target"] = None
  if args.out:
    with open(args.out, "w") as f:
      json.dump(summary, f, indent=1)
  print(f"device: {device}" + (f"  (NOT COMPARABLE: {args.not_comparable})"
                                if args.not_comparable else ""))
  for n, r in summary["runs"].items():
    print(f"  {n:22} rc {r['rc']}, {r['seconds']:.0f} s" + (" (skipped)" if r["skipped"] else "")
          + (" (timed out)" if r["timed_out"] else "")
          + (" (dry run)" if (rows[n].get("result") or {}).get("dry_run") else ""))
  for fig in summary["figures"]:
    v = fig["value"]
    shown = "n/a" if v is None else f"{v:.4g}"
    mark = {True: "meets", False: "MISSES", None: "-"}[fig["meets_target"]]
    print(f"  {fig['figure']:55} {shown:>10} {fig['unit']:8} target {fig['target']:g}  {mark}"
          + (f"  ({fig['note']})" if fig["note"] else ""))
  sys.stdout.flush()


if __name__ == "__main__":
  main()
