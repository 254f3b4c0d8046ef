"""The memory pre-flight: the real train steps (and the sample job's programs) compiled
from shapes on 4 simulated devices.

Compiles run in subprocesses that start JAX with 4 CPU devices (this test
process has conftest's 8), each bounded by a timeout. The :tiny,l2vq tokenizer
and the :tiny generator keep every compile small.
"""
import json
import os
import subprocess
import sys

import pytest

from phenaki_jax import preflight
from phenaki_jax.config.schema import ConfigError
from tests.helpers import REPO, load_config

TIMEOUT_S = 300


def _env() -> dict:
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # conftest's 8 devices; the tool sets its own count
  env.update(JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="3")
  return env


def _cli(*flags: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "phenaki_jax.preflight", *flags], cwd=REPO,
                        env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S)


# Several pre-flights in one process (one JAX start-up), through the Python API.
_SCRIPT = """
import json, sys
from phenaki_jax import preflight
preflight.ensure_cpu_devices(4)
from tests.helpers import load_config
runs = {
    "cvivit_dp": ("cvivit", "tiny,l2vq", (4, 1, 1)),
    "cvivit_fsdp": ("cvivit", "tiny,l2vq", (1, 4, 1)),
    "maskgit_dp": ("maskgit", "tiny", (4, 1, 1)),
    "maskgit_fsdp": ("maskgit", "tiny", (1, 4, 1)),
    # The sample job: the :tiny generator's 2 heads split over 'tensor'.
    "sample": ("sample", "tiny", (2, 1, 2)),
}
out = {}
for name, (job, variant, mesh) in runs.items():
  report = preflight.preflight(load_config(job, variant), mesh_shape=mesh,
                               config_name=f"configs/{job}.py:{variant}")
  out[name] = report.to_json()
with open(sys.argv[1], "w") as f:
  json.dump(out, f)
"""


@pytest.fixture(scope="module")
def api_reports(tmp_path_factory):
  path = tmp_path_factory.mktemp("preflight") / "reports.json"
  proc = subprocess.run([sys.executable, "-c", _SCRIPT, str(path)], cwd=REPO, env=_env(),
                        capture_output=True, text=True, timeout=TIMEOUT_S)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(path) as f:
    return json.load(f)


def test_reports_have_positive_sizes_and_say_they_are_cpu_estimates(api_reports):
  for name, r in api_reports.items():
    if name == "sample":
      continue
    m = r["memory"]
    assert m["argument"] > 0 and m["temp"] > 0, name
    assert m["total"] == m["argument"] + m["output"] - m["alias"] + m["temp"] + \
        m["generated_code"], name
    # The donated train state comes back in place: its outputs alias the inputs.
    assert m["alias"] > 0, name
    # The arguments hold at least this device's shards of the train state.
    assert m["argument"] >= r["state_bytes_per_device"] > 0, name
    assert r["cost"]["flops"] > 0, name
    assert r["estimate"] and any("ESTIMATE" in n for n in r["notes"]), name
    assert r["mesh"]["data"] * r["mesh"]["fsdp"] == 4
  assert api_reports["cvivit_dp"]["step"].startswith("tokenizer update, GAN phase 'off'")
  assert "frozen tokenizer shapes from configs/cvivit.py:tiny" in \
      api_reports["maskgit_dp"]["notes"][0]


@pytest.mark.parametrize("job", ["cvivit", "maskgit"])
def test_fsdp_shards_parameters_and_optimizer_state(api_reports, job):
  dp, fsdp = api_reports[f"{job}_dp"], api_reports[f"{job}_fsdp"]
  # Same global batch over 4 ways either way: only the state's layout differs.
  assert dp["per_device_batch"] == fsdp["per_device_batch"] == 2
  # Parameters, two Adam moments and the EMA, split 4 ways along 'embed'
  # (small vectors such as biases and norms stay whole): measured 0.25-0.27.
  assert fsdp["state_bytes_per_device"] < 0.3 * dp["state_bytes_per_device"]
  batch_bytes = dp["memory"]["argument"] - dp["state_bytes_per_device"]
  assert fsdp["memory"]["argument"] - fsdp["state_bytes_per_device"] == batch_bytes
  ratio = fsdp["memory"]["argument"] / dp["memory"]["argument"]
  # The batch is the same per device: measured 0.27 (tokenizer), 0.35 (generator).
  assert ratio < 0.45, (ratio, dp["memory"], fsdp["memory"])


def test_cli_table_json_and_hbm_limit(tmp_path):
  out = tmp_path / "report.json"
  proc = _cli("--config=configs/cvivit.py:tiny,l2vq", "--mesh=4,1,1", "--hbm_gib=0.001",
              f"--out={out}")
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert "total (must fit)" in proc.stdout and "ESTIMATE" in proc.stdout
  assert "on cpu (4 simulated devices)" in proc.stdout
  report = json.loads(out.read_text())
  assert report["fits"] is False and report["hbm_gib"] == 0.001
  figure = f"{report['memory']['total'] / 2 ** 30:.2f} GiB per device"
  error = proc.stderr.strip().splitlines()[-1]
  assert error.startswith("error: configs/cvivit.py:tiny,l2vq on mesh (data,fsdp,tensor)=(4,1,1)")
  assert figure in error and "--hbm_gib=0.001" in error


def test_cli_bad_mesh_fails_naming_the_key_and_flag_before_compiling():
  proc = _cli("--config=configs/cvivit.py:tiny", "--mesh=3,1,1", "--devices=4")
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert "config.mesh.shape=(3, 1, 1)" in proc.stderr and "--mesh" in proc.stderr
  assert "compile:" not in proc.stdout


def test_bad_mesh_fails_before_compiling_in_process():
  # conftest gives this process 8 CPU devices.
  config = load_config("cvivit", "tiny")
  with pytest.raises(ConfigError, match=r"config\.mesh\.shape=\(3, 1, 1\).*--mesh"):
    preflight.preflight(config, mesh_shape=(3, 1, 1), num_devices=8)
  with pytest.raises(ConfigError, match=r"config\.model\.num_heads=2.*tensor"):
    preflight.preflight(config, mesh_shape=(1, 1, 8))
  config.input.batch_size = 6
  with pytest.raises(ConfigError, match=r"config\.input\.batch_size=6.*8 ways"):
    preflight.preflight(config, mesh_shape=(4, 2, 1))
  with pytest.raises(preflight.PreflightError, match=r"--devices=16: this process has only 8"):
    preflight.preflight(config, mesh_shape=(16, 1, 1))
  with pytest.raises(preflight.PreflightError, match=r"--mesh=2,2: expected three"):
    preflight.parse_mesh("2,2")


def test_mesh_flag_sets_the_simulated_device_count():
  # pylint: disable=protected-access
  assert preflight._cpu_device_count_from_argv(["--mesh=1,4,2"]) == 8
  assert preflight._cpu_device_count_from_argv(["--mesh=-1,4,1"]) is None
  assert preflight._cpu_device_count_from_argv(["--mesh=-1,4,1", "--devices=16"]) == 16
  assert preflight._cpu_device_count_from_argv(["--topology=v5p:2x2x1", "--devices=4"]) is None


def test_sample_report_holds_the_three_networks_weights_and_the_largest_program(api_reports):
  r = api_reports["sample"]
  assert r["job"] == "sample" and r["mesh"] == {"data": 2, "fsdp": 1, "tensor": 2}
  assert r["generator"] == "configs/maskgit.py:tiny" and r["tokenizer"] == "configs/cvivit.py:tiny"
  assert r["batch"] == 8 and r["batch_ways"] == 2  # over data; 'tensor' splits weights only
  assert set(r["weights_bytes_per_device"]) == {"generator", "text encoder", "tokenizer"}
  # float32 weights: split by 'tensor' (heads, mlp, vocab), under 4 bytes a parameter.
  for net in ("generator", "tokenizer"):
    assert r["weights_bytes_per_device"][net] < 4 * r["params"][net], net
  assert r["weights_layout"]["tokenizer"] == "by its rules"
  assert set(r["programs"]) == {"sampling", "decode", "encode"}
  for name, m in r["programs"].items():
    assert m["temp"] > 0 and m["inputs"] > 0 and m["beyond_weights"] >= m["temp"], name
  largest = max(m["beyond_weights"] for m in r["programs"].values())
  assert r["total_bytes"] == sum(r["weights_bytes_per_device"].values()) + largest
  assert r["fits"] is None and r["estimate"]
  # The verdict and the message a too-small --hbm_gib gets.
  fields = {k: v for k, v in r.items() if k not in ("total_bytes", "total_gib", "fits")}
  report = preflight.SampleReport(**{**fields, "hbm_gib": 1e-4})
  assert report.fits is False and "DOES NOT FIT in 0.0001 GiB" in report.table()
  assert report.too_big_message().startswith(
      "error: configs/sample.py:tiny on mesh (data,fsdp,tensor)=(2,1,2) needs ")


def test_sample_preflight_refuses_a_batch_the_mesh_cannot_split_before_compiling():
  config = load_config("sample", "tiny")
  config.batch_size = 6  # conftest's 8 devices, (4,2,1): data·fsdp = 8 ways
  with pytest.raises(ConfigError, match=r"config\.batch_size=6: must be divisible by the 8 "
                                        r"ways.*\[--mesh, 8 devices\]"):
    preflight.preflight(config, mesh_shape=(4, 2, 1), config_name="configs/sample.py:tiny")
  with pytest.raises(ConfigError, match=r"config\.mesh\.shape=\(1, 1, 8\): the generator's "
                                        r"weights do not split evenly"):
    preflight.preflight(config, mesh_shape=(1, 1, 8), config_name="configs/sample.py:tiny")
