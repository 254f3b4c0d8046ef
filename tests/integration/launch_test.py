"""Launch scripts: the gcloud commands tpu_pod.sh prints, and gpu_slurm.sbatch's hand-off.

Nothing here talks to Google Cloud or SLURM: tpu_pod.sh runs with --dry-run and a
`gcloud` on PATH that fails if called; the sbatch script runs with a fake
`scontrol` and `srun`.
"""
import json
import os
import shlex
import subprocess
import sys
import textwrap

import pytest

from tests.helpers import REPO

TPU_POD = str(REPO / "launch" / "tpu_pod.sh")
SBATCH = str(REPO / "launch" / "gpu_slurm.sbatch")


def _write_script(path, text):
  path.write_text(textwrap.dedent(text))
  path.chmod(0o755)


@pytest.fixture
def no_gcloud(tmp_path):
  """PATH with a gcloud that fails: a dry run must never call it."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  _write_script(bin_dir / "gcloud", """\
      #!/bin/sh
      echo "gcloud must not run in a dry run" >&2
      exit 99
      """)
  env = {k: v for k, v in os.environ.items()
         if k not in ("TPU_NAME", "TPU_ACCELERATOR", "TPU_ZONE", "GCP_PROJECT")}
  env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
  return env


def _dry_run(env, *args):
  proc = subprocess.run(["bash", TPU_POD, "--dry-run", *args], capture_output=True, text=True,
                        env=env, timeout=60, cwd=REPO)
  assert proc.returncode == 0, proc.stderr
  commands = [shlex.split(line) for line in proc.stdout.splitlines()
              if line and not line.startswith("#")]
  assert commands and all(c[0] == "gcloud" for c in commands), proc.stdout
  return commands


def _flag(command, name):
  values = [a.split("=", 1)[1] for a in command if a.startswith(name + "=")]
  assert len(values) == 1, (name, command)
  return values[0]


@pytest.mark.parametrize("syntax_of", [TPU_POD, SBATCH])
def test_scripts_parse(syntax_of):
  subprocess.run(["bash", "-n", syntax_of], check=True, timeout=30)


@pytest.mark.parametrize("accelerator,gcloud_type,zone,runtime,queued", [
    ("v5p-128", "v5p-128", "us-east5-a", "v2-alpha-tpuv5", False),
    ("v5e-256", "v5litepod-256", "us-west4-a", "v2-alpha-tpuv5-lite", True),
])
def test_pod_lifecycle_commands(no_gcloud, accelerator, gcloud_type, zone, runtime, queued):
  common = ["--name", "phenaki-pod", "--accelerator", accelerator, "--zone", zone,
            "--project", "my-proj"] + (["--queued", "--spot"] if queued else [])

  (create,) = _dry_run(no_gcloud, "create", *common)
  if queued:
    assert create[:5] == ["gcloud", "compute", "tpus", "queued-resources", "create"]
    assert _flag(create, "--node-id") == "phenaki-pod"
    assert _flag(create, "--runtime-version") == runtime
    assert "--spot" in create
  else:
    assert create[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "create"]
    assert _flag(create, "--version") == runtime
  assert create[5] == "phenaki-pod"
  assert _flag(create, "--accelerator-type") == gcloud_type
  assert _flag(create, "--zone") == zone
  assert _flag(create, "--project") == "my-proj"

  install = _dry_run(no_gcloud, "install", *common)
  assert [c[4] for c in install] == ["scp", "ssh"]
  assert all(_flag(c, "--worker") == "all" and _flag(c, "--zone") == zone for c in install)
  assert "pip install -q -e '.[tpu]'" in _flag(install[1], "--command")

  (run,) = _dry_run(no_gcloud, "run", *common, "--config", "configs/cvivit.py:paper",
                    "--workdir", "gs://my-bucket/runs/cvivit-paper",
                    "--config.total_steps=200000", "--config.mesh.shape=(-1,1,1)")
  assert run[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "phenaki-pod"]
  assert _flag(run, "--worker") == "all"
  remote = _flag(run, "--command")
  assert "nohup python -m phenaki_jax.main" in remote
  assert "--config=configs/cvivit.py:paper" in remote
  assert "--workdir=gs://my-bucket/runs/cvivit-paper" in remote
  assert "--config.total_steps=200000" in remote and "--distributed=on" in remote
  assert "$(hostname).log" in remote  # one log file per worker

  for command in ("logs", "stop"):
    (ssh,) = _dry_run(no_gcloud, command, *common)
    assert ssh[4] == "ssh" and _flag(ssh, "--zone") == zone
  (delete,) = _dry_run(no_gcloud, "delete", *common)
  assert delete[3:5] == (["queued-resources", "delete"] if queued else ["tpu-vm", "delete"])


def test_run_command_executes_on_a_worker(no_gcloud, tmp_path):
  """The remote shell command, run locally against a fake checkout, passes the flags intact."""
  (run,) = _dry_run(no_gcloud, "run", "--name", "p", "--zone", "z",
                    "--workdir", "gs://b/run one", "--run-name", "r1",
                    "--config.input.video_shards=gs://b/it's data")
  home = tmp_path / "home"
  venv_bin = home / "phenaki_jax" / ".venv" / "bin"
  venv_bin.mkdir(parents=True)
  (venv_bin / "activate").write_text(f'PATH="{venv_bin}:$PATH"\n')
  _write_script(venv_bin / "python", f"""\
      #!{sys.executable}
      import json, sys
      json.dump(sys.argv[1:], open({str(home / 'argv.json')!r}, "w"))
      """)
  env = dict(no_gcloud, HOME=str(home))
  subprocess.run(["bash", "-c", _flag(run, "--command")], env=env, check=True, timeout=60)
  for _ in range(100):  # the job runs in the background
    if (home / "argv.json").exists() and (home / "argv.json").stat().st_size:
      break
    subprocess.run(["sleep", "0.1"], check=True)
  argv = json.loads((home / "argv.json").read_text())
  assert argv == ["-m", "phenaki_jax.main", "--config=configs/cvivit.py:paper",
                  "--workdir=gs://b/run one", "--distributed=on",
                  "--config.input.video_shards=gs://b/it's data"]
  logs = os.listdir(home / "phenaki_logs")
  assert "job.pid" in logs and any(f.startswith("r1-") and f.endswith(".log") for f in logs)


def test_pod_script_errors(no_gcloud):
  def fails(*args):
    proc = subprocess.run(["bash", TPU_POD, "--dry-run", *args], capture_output=True, text=True,
                          env=no_gcloud, timeout=60)
    assert proc.returncode != 0
    return proc.stderr
  assert "--workdir" in fails("run", "--name", "p", "--zone", "z", "--workdir", "/local/dir")
  assert "--zone" in fails("create", "--name", "p", "--accelerator", "v5p-8")
  assert "--runtime-version" in fails("create", "--name", "p", "--zone", "z",
                                      "--accelerator", "v9x-8")
  assert "unknown argument" in fails("create", "--name", "p", "--zone", "z", "--bogus")


def test_slurm_tasks_get_coordinator_and_ranks(tmp_path):
  """gpu_slurm.sbatch with a fake scontrol/srun: what distributed.plan sees in each task."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  _write_script(bin_dir / "scontrol", """\
      #!/bin/sh
      printf 'gpu-node-07\\ngpu-node-08\\n'
      """)
  # srun: drop its own flags, run the task once per rank.
  _write_script(bin_dir / "srun", """\
      #!/bin/bash
      while [ "$1" != bash ]; do shift; done
      for rank in 0 1; do SLURM_PROCID=$rank "$@" || exit $?; done
      """)
  venv_bin = tmp_path / "venv" / "bin"
  venv_bin.mkdir(parents=True)
  (venv_bin / "activate").write_text(f'PATH="{venv_bin}:$PATH"\n')
  # python: record the plan distributed.py makes from this task's env, and argv.
  _write_script(venv_bin / "python", f"""\
      #!{sys.executable}
      import json, sys
      sys.path.insert(0, {str(REPO)!r})
      from phenaki_jax import distributed
      p = distributed.plan()
      with open({str(tmp_path / "plans.jsonl")!r}, "a") as f:
        f.write(json.dumps([p.kind, p.coordinator_address, p.num_processes, p.process_id,
                            sys.argv[1:]]) + "\\n")
      """)
  env = {k: v for k, v in os.environ.items() if not k.startswith(("PHENAKI_", "SLURM_"))}
  env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", SLURM_JOB_ID="1234",
             SLURM_JOB_NUM_NODES="2", SLURM_NTASKS="2", SLURM_JOB_NODELIST="gpu-node-[07-08]",
             PHENAKI_REPO=str(REPO), PHENAKI_VENV=str(tmp_path / "venv"), JAX_PLATFORMS="cpu")
  proc = subprocess.run(["bash", SBATCH, "--config=configs/cvivit.py:paper",
                         "--workdir=/shared/runs/x", "--config.mesh.shape=(-1,1,1)"],
                        capture_output=True, text=True, env=env, timeout=120)
  assert proc.returncode == 0, proc.stderr
  with open(tmp_path / "plans.jsonl") as f:
    plans = [json.loads(line) for line in f]
  args = ["-m", "phenaki_jax.main", "--config=configs/cvivit.py:paper",
          "--workdir=/shared/runs/x", "--config.mesh.shape=(-1,1,1)"]
  assert plans == [["explicit", "gpu-node-07:21234", 2, rank, args] for rank in (0, 1)]


def test_slurm_script_needs_config_and_workdir(tmp_path):
  env = dict(os.environ, SLURM_JOB_ID="1")
  proc = subprocess.run(["bash", SBATCH, "--config=configs/cvivit.py"], capture_output=True,
                        text=True, env=env, timeout=30)
  assert proc.returncode != 0 and "--workdir" in proc.stderr


def _readme_pod_runs():
  """The `launch/tpu_pod.sh run` commands of launch/README.md's walk-through, as argv lists."""
  text = (REPO / "launch" / "README.md").read_text()
  block = text.split("## From zero to a running TPU pod job", 1)[1].split("```bash", 2)[2]
  block = block.split("```", 1)[0].replace("\\\n", " ")
  env = {}
  runs = []
  for line in block.splitlines():
    line = line.split("#", 1)[0].strip()
    if "=" in line.split(" ", 1)[0] and not line.startswith("launch/"):
      key, value = line.split("=", 1)
      env[key] = shlex.split(value)[0]
    elif line.startswith("launch/tpu_pod.sh run"):
      for key, value in env.items():
        line = line.replace(f"${key}", value)
      runs.append(shlex.split(line)[2:])
  return runs


def test_the_readme_pod_walk_through_runs_configs_that_exist(no_gcloud, tmp_path):
  """Each job the walk-through starts names real config files, variants and keys."""
  from absl import flags
  from ml_collections import config_flags
  runs = _readme_pod_runs()
  assert len(runs) >= 5, runs  # prepare, tokenizer, generator, samples, eval
  jobs = []
  for args in runs:
    (run,) = _dry_run(no_gcloud, "run", *args)
    remote = shlex.split(_flag(run, "--command").split("nohup python -m phenaki_jax.main", 1)[1]
                         .split(">", 1)[0])
    assert all(a.startswith("gs://") for a in
               [a.split("=", 1)[1] for a in remote if a.startswith("--workdir=")]), remote
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True,
                                    sys_argv=["main"] + remote)
    for name in ("workdir", "distributed"):
      flags.DEFINE_string(name, None, "", flag_values=fv)
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
      fv(["main"] + remote)  # an unknown key or a bad value raises here
    finally:
      os.chdir(cwd)
    config = fv["config"].value
    jobs.append(config.job)
    for arg in remote:
      if arg.startswith("--config.") and "gs://" in arg:
        key, value = arg[len("--config."):].split("=", 1)
        node = config
        for part in key.split("."):
          node = node[part]
        assert node == value, (key, node)
  assert jobs == ["prepare", "cvivit", "maskgit", "sample", "eval_generated"], jobs


def test_each_accelerator_extra_brings_the_jax_the_package_pins():
  """`pip install -e ".[tpu]"` / `".[cuda12]"` / `".[cuda13]"`: jax's own extra, same range."""
  import ast
  tree = ast.parse((REPO / "setup.py").read_text())
  values = {t.id: ast.literal_eval(node.value) for node in tree.body
            if isinstance(node, ast.Assign) for t in node.targets if isinstance(t, ast.Name)
            and t.id in ("INSTALL_REQUIRES", "EXTRAS_REQUIRE")}
  (jax_pin,) = [r for r in values["INSTALL_REQUIRES"] if r.startswith("jax>")]
  for accelerator in ("tpu", "cuda12", "cuda13"):
    assert values["EXTRAS_REQUIRE"][accelerator] == [
        jax_pin.replace("jax", f"jax[{accelerator}]", 1)], accelerator
  for script in ("tpu_pod.sh", "gpu_slurm.sbatch"):
    text = (REPO / "launch" / script).read_text()
    assert "jax[" not in text, f"{script} pins jax by hand; use the extras"
