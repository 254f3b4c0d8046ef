"""benchmarks/gpu_suite.sh: every GPU command line parses and its configs load (on a CPU).

The suite's --smoke mode (every command run at tiny sizes) takes minutes on
2 cores, so the test runs --dry-run instead: the same command lines as on the
GPU, each with its dry-run flag (train_step.py / sampling.py --dry_run: flags
parsed, configs loaded and checked, parameters counted abstractly;
side_by_side.py --torch_dry_run: the torch venv's pip commands and the driver's
command line). Nothing compiles. The summary script is checked on made-up
results.
"""
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SUITE = os.path.join(REPO, "benchmarks", "gpu_suite.sh")
NAMES = ["generator_train_step", "sampling", "tokenizer_full", "side_by_side",
         "tokenizer_full_r1"]


def _env():
  # One CPU device, as on a user's machine (conftest simulates 8 for sharding tests).
  return {**{k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "OUT")},
          "PYTHON": sys.executable}


def test_print_lists_every_measurement():
  out = subprocess.run(["bash", SUITE, "--print"], capture_output=True, text=True, timeout=60,
                       cwd=REPO, env=_env())
  assert out.returncode == 0, out.stderr
  for name in NAMES:
    assert f"# {name} " in out.stdout
  assert "--sizes=gpu --torch_device=cuda" in out.stdout
  assert out.stdout.count("bench_configs.py:gpu") >= 5


def test_dry_run_parses_every_gpu_command(tmp_path):
  out = subprocess.run(["bash", SUITE, "--dry-run", str(tmp_path)], capture_output=True,
                       text=True, timeout=600, cwd=REPO, env=_env())
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  rows = [json.loads(l) for l in (tmp_path / "results.jsonl").read_text().splitlines() if l]
  assert [r["name"] for r in rows] == NAMES
  for r in rows:
    assert r["rc"] == 0, (r, (tmp_path / "log.txt").read_text()[-3000:])
  by = {r["name"]: r["result"] for r in rows}
  gen = by["generator_train_step"]
  assert gen["dry_run"] and gen["model_dtype"] == "bfloat16"
  assert 2.8e8 < gen["params"] < 3.2e8  # '~300M'
  assert tuple(gen["token_grid"]) == (6, 16, 16)
  samp = by["sampling"]
  assert samp["clip"] == "11x128x128" and samp["steps"] == [12]
  assert samp["kinds"] == ["guided", "guided+decode"]
  for name, phase in (("tokenizer_full", "on"), ("tokenizer_full_r1", "r1")):
    tok = by[name]
    assert tok["clip"] == "11x128x128" and tok["perceptual"] and tok["gan_phase"] == phase
  text = by["side_by_side"]["text"]
  # The torch side in its fastest mixed-precision mode, at the GPU sizes.
  assert "--device=cuda --amp=bf16 --tf32 --fused_adamw" in text
  assert '"depth": 17' in text and '"resolution": 128' in text
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert all(f["meets_target"] is None for f in summary["figures"])


def test_torch_driver_dry_run_needs_no_torch():
  out = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "_phenaki_pytorch_steps.py"),
                        "--dry_run", "--device=cuda", "--amp=bf16", "--tf32", "--compile"],
                       capture_output=True, text=True, timeout=60)
  assert out.returncode == 0, out.stderr
  settings = json.loads(out.stdout)["settings"]
  assert settings["device"] == "cuda" and settings["amp"] == "bf16" and settings["compile"]
  assert settings["spec"]["maskgit"]["grid"] == [6, 8, 8]  # the reference sizes by default


def test_report_holds_each_figure_against_its_target(tmp_path):
  def row(name, result, rc=0):
    return json.dumps({"name": name, "rc": rc, "seconds": 1.0, "timeout_s": 9,
                       "timed_out": False, "skipped": False, "result": result})
  lines = [
      row("generator_train_step", {"device": "1 × NVIDIA H100", "mfu": 0.45, "params": 3e8,
                                   "step_s_median": 0.05, "tokens_per_s": 5e5}),
      row("sampling", {"results": [
          {"guidance": "guided", "batch": 1, "steps": 12, "p50_s": 0.1},
          {"guidance": "guided+decode", "batch": 1, "steps": 12, "p50_s": 0.2}]}),
      row("side_by_side", {"cvivit_speedup": 3.5, "maskgit_speedup": 2.0, "cvivit_step_s": 0.1,
                           "phenaki_pytorch_cvivit_step_s": 0.35, "settings": {}}),
      row("tokenizer_full", {"frames_per_s": 1600.0, "step_s_median": 0.11,
                             "frozen_weights": "random"}),
      row("tokenizer_full_r1", {"frames_per_s": 800.0, "step_s_median": 0.22}),
  ]
  (tmp_path / "results.jsonl").write_text("\n".join(lines) + "\n")
  out = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "_gpu_suite_report.py"),
                        str(tmp_path / "results.jsonl"), f"--out={tmp_path / 's.json'}"],
                       capture_output=True, text=True, timeout=60)
  assert out.returncode == 0, out.stderr
  figs = {f["figure"]: f for f in json.loads((tmp_path / "s.json").read_text())["figures"]}
  meets = {k: v["meets_target"] for k, v in figs.items()}
  assert meets["generator train step MFU (~300M)"] is True
  assert meets["sampling latency, tokens only, 12 guided steps"] is True
  assert meets["sampling latency, clip 11x128x128, 12 guided steps + decode"] is False
  assert meets["side-by-side cvivit: phenaki-pytorch step / ours"] is True
  assert meets["side-by-side maskgit: phenaki-pytorch step / ours"] is False
  assert meets["tokenizer full objective, GAN 'on' step (3 in 4)"] is True
  # 176 frames per step; (3 × 0.11 + 0.22) / 4 = 0.1375 s: 1,280 frames/s.
  avg = figs["tokenizer full objective, average with lazy R1"]
  assert abs(avg["value"] - 1600 * 0.11 / 0.1375) < 1e-6 and avg["meets_target"] is False
