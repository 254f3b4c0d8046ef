"""benchmarks/side_by_side.py --ours-only --json prints one parseable JSON line."""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow  # 27-32 s; gpu_suite_test checks the side-by-side commands in CI
def test_ours_only_json_prints_the_step_times():
  out = subprocess.run(
      [sys.executable, os.path.join(REPO, "benchmarks", "side_by_side.py"), "--ours-only",
       "--json", "--steps=1", "--warmup=0", "--sizes=tiny"],
      capture_output=True, text=True, timeout=300, cwd=REPO,
      # One CPU device, as on a user's machine (conftest simulates 8 for sharding tests).
      env={**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}, "PYTHONPATH": REPO})
  assert out.returncode == 0, out.stderr[-3000:]
  lines = [l for l in out.stdout.splitlines() if l.strip()]
  assert len(lines) == 1, out.stdout
  result = json.loads(lines[0])
  for key in ("cvivit_step_s", "maskgit_step_s"):
    assert isinstance(result[key], float) and result[key] > 0
  assert "phenaki_pytorch_cvivit_step_s" not in result
