"""phenaki_jax vs lucidrains' phenaki-pytorch: train-step time at the same sizes.

  python benchmarks/side_by_side.py [--steps=6 --warmup=2 --threads=2]
  python benchmarks/side_by_side.py --ours-only --json     # one JSON line, ours only
  python benchmarks/side_by_side.py --sizes=gpu --torch_device=cuda --json   # on a GPU

--sizes (benchmarks/bench_configs.py; the script prints them with both sides'
parameter counts):
  reference  STACK.md's 'Reference speed of the nearest peer' (the CPU target):
    C-ViViT  batch 4, 11×64×64 clips, patch 8, temporal patch 2, width 256,
             4×64 heads, depth 2 spatial + 2 temporal, 8,192 codes, loss
             reconstruction + VQ only (no LPIPS / I3D / GAN), AdamW.
    MaskGIT  batch 4, 384 tokens (6×8×8), 8,192 codes, width 256, depth 4,
             4×64 heads, MLP 1024, cross-attention to 16 text embeddings of
             width 512, AdamW.  Ours 6.92M / 8.58M parameters, float32.
  gpu        issue 11's GPU target: the paper's tokenizer and a ~300M generator:
    C-ViViT  batch 8, 11×128×128 clips, patch 8, temporal patch 2 (6×16×16 =
             1,536 tokens), width 512, 8×64 heads, MLP 2,048, depth 4 spatial +
             4 temporal, 8,192 codes, reconstruction + VQ only, AdamW. Ours
             51.6M parameters.
    MaskGIT  batch 16, 1,536 tokens (6×16×16), 8,192 codes, width 1,024,
             17 blocks, 16×64 heads, MLP 4,096, cross-attention to 64 text
             embeddings of width 512, AdamW. Ours 303M parameters.
             Ours in bf16 compute (model.dtype, float32 master weights).
  tiny       seconds on a CPU, for smoke tests only.

phenaki-pytorch 0.5.0 runs in its own interpreter; benchmarks/_phenaki_pytorch_steps.py
drives it. Where that interpreter comes from:
  --torch_device=cpu (default): benchmarks/.venv-phenaki-pytorch, made on first
    use: torch 2.13.0 CPU from the local wheel, the package and its model-code
    dependencies with --no-deps where pip would pull CUDA wheels; `--threads`
    torch threads, float32 (the CPU reference measurements).
  --torch_device=cuda: --torch_python=PY uses an interpreter that already has a
    CUDA torch (e.g. a GPU image's python3), with phenaki-pytorch and its
    model dependencies importable from it or from --torch_pythonpath (a folder
    made with `pip install --target`; gpu_suite.sh --prepare fetches the wheels);
    otherwise a separate venv, --torch_venv (default
    benchmarks/.venv-phenaki-pytorch-cuda), made on first use with
    `pip install torch==--torch_version` from --torch_index_url (default: the
    configured index, whose Linux x86-64 torch wheels are CUDA builds; give
    PyTorch's own per-CUDA-version wheel index to pick a CUDA version).
    --torch_dry_run prints the pip commands (and the driver's settings) and
    stops. Fastest settings by default on CUDA: torch.autocast(bfloat16)
    (--torch_amp), TF32 matmuls / convolutions (--torch_tf32), fused AdamW
    (--torch_fused_adamw), cudnn.benchmark; --torch_compile adds torch.compile
    (its compile time falls into the warm-up steps: give --warmup >= 3).
    channels_last does not apply: phenaki-pytorch's steps are linear layers and
    attention (its only convolutions are the small depthwise PEGs).
    Timing brackets each step with torch.cuda.synchronize().
Ours runs in this process through the trainers' own steps (benchmarks/_timing.py),
in the same run, so the ratio is of two measurements under the same load.
Differences that remain: theirs skips its VQ commitment loss with the GAN off
and quantises lookup-free (LFQ; ours: codebook + commitment losses, 32-dim
l2-normalised lookup, dead-code restarts, EMA of the weights); theirs adds
continuous position-bias MLPs and PEG convolutions; ours counts the masked-token
loss, bucket metrics and a non-finite-step guard. Both are what the users run.
The JSON (--json) holds both sides' step times (cvivit_step_s, maskgit_step_s
for ours; phenaki_pytorch_* for theirs), the ratios (*_speedup: > 1 means ours
is faster), and the settings used (sizes, dtypes, torch settings).
Not a test: figures go to benchmarks/RESULTS.md with the command, machine and date.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, REPO)

VENV = os.path.join(HERE, ".venv-phenaki-pytorch")
CUDA_VENV = os.path.join(HERE, ".venv-phenaki-pytorch-cuda")
DRIVER = os.path.join(HERE, "_phenaki_pytorch_steps.py")
PHENAKI_PYTORCH = "phenaki-pytorch==0.5.0"
TORCH = "torch==2.13.0"  # the CPU wheel in the local wheel folder (see setup.py's test extra)
# Imported by phenaki-pytorch's model code; pip's resolver would pull CUDA
# torch/torchvision for the package itself, so it goes in with --no-deps and
# these go in next to the CPU torch (its trainers' torchvision / OpenCV /
# accelerate / transformers are never imported on the timed path).
MODEL_DEPS = ["einops>=0.7", "beartype", "ema-pytorch>=0.2.2", "vector-quantize-pytorch>=1.11.8",
              "torchtyping", "numpy", "pillow", "tqdm", "typing_extensions", "filelock", "sympy",
              "networkx", "jinja2", "fsspec"]


def venv_python(venv: str = VENV) -> str:
  return os.path.join(venv, "bin", "python")


def _driver_env(pythonpath: str = "") -> dict:
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  if pythonpath:
    env["PYTHONPATH"] = pythonpath
  return env


def importable(py: str, pythonpath: str = "") -> bool:
  """Whether `py` imports torch and phenaki-pytorch's model code (trainers placeholdered)."""
  if not os.path.exists(py) and not shutil.which(py):
    return False
  return subprocess.run([py, DRIVER, "--check_import"], capture_output=True,
                        env=_driver_env(pythonpath)).returncode == 0


def venv_commands(venv: str, device: str, torch_version: str, index_url: str) -> list[list[str]]:
  """The commands that make and fill a phenaki-pytorch venv (what --torch_dry_run prints)."""
  py = venv_python(venv)
  pip = [py, "-m", "pip", "install", "-q"]
  if device == "cpu":
    torch = ["--no-deps", TORCH]
  else:
    # The CUDA build with its nvidia-* runtime wheels (so not --no-deps).
    torch = [f"torch=={torch_version}"] + (["--index-url", index_url] if index_url else [])
  return [[sys.executable, "-m", "venv", venv], pip + torch,
          pip + ["--no-deps", PHENAKI_PYTORCH], pip + MODEL_DEPS]


def ensure_phenaki_pytorch(args: argparse.Namespace | None = None) -> tuple[str, str]:
  """(interpreter, PYTHONPATH) that run phenaki-pytorch; a venv is made and filled on first use."""
  device = args.torch_device if args else "cpu"
  if args is not None and args.torch_python:
    if not importable(args.torch_python, args.torch_pythonpath):
      raise RuntimeError(f"--torch_python={args.torch_python} (PYTHONPATH="
                         f"{args.torch_pythonpath!r}) cannot import torch and phenaki_pytorch: "
                         f"`{args.torch_python} {DRIVER} --check_import` says why")
    return args.torch_python, args.torch_pythonpath
  venv = (args.torch_venv if args and args.torch_venv else (VENV if device == "cpu" else CUDA_VENV))
  py = venv_python(venv)
  if importable(py):
    return py, ""
  print(f"making {venv} (phenaki-pytorch, torch {device}) ...", file=sys.stderr)
  for cmd in venv_commands(venv, device, args.torch_version if args else "",
                           args.torch_index_url if args else ""):
    subprocess.run(cmd, check=True)
  return py, ""


def torch_settings(args: argparse.Namespace) -> dict:
  """The driver's settings: on CUDA the fastest mode unless a flag says otherwise."""
  cuda = args.torch_device == "cuda"
  pick = lambda value, default: default if value is None else value
  return {"device": args.torch_device,
          "amp": args.torch_amp if args.torch_amp != "auto" else ("bf16" if cuda else "none"),
          "tf32": pick(args.torch_tf32, cuda),
          "fused_adamw": pick(args.torch_fused_adamw, cuda),
          "compile": bool(args.torch_compile)}


def driver_command(py: str, args: argparse.Namespace, spec: dict) -> list[str]:
  t = torch_settings(args)
  cmd = [py, DRIVER, f"--steps={args.steps}", f"--warmup={args.warmup}",
         f"--threads={args.threads}", f"--spec={json.dumps(spec)}", f"--device={t['device']}",
         f"--amp={t['amp']}"]
  cmd += [f"--{k}" for k in ("tf32", "fused_adamw", "compile") if t[k]]
  return cmd


def run_theirs(steps: int, warmup: int, threads: int, args: argparse.Namespace | None = None,
               spec: dict | None = None) -> dict:
  if args is None:  # the CPU reference, as before
    args = argparse.Namespace(steps=steps, warmup=warmup, threads=threads, torch_device="cpu",
                              torch_amp="auto", torch_tf32=None, torch_fused_adamw=None,
                              torch_compile=False, torch_python="", torch_pythonpath="",
                              torch_venv="", torch_version="", torch_index_url="")
  py, pythonpath = ensure_phenaki_pytorch(args)
  env = {**_driver_env(pythonpath), "OMP_NUM_THREADS": str(threads),
         "MKL_NUM_THREADS": str(threads)}
  cmd = driver_command(py, args, spec if spec is not None else torch_spec("reference"))
  if args.torch_device == "cpu":  # one process for both, as the CPU reference figures were taken
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
      raise RuntimeError(f"phenaki-pytorch steps failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])
  # On a GPU, one process per model: one that fails (out of memory, say) is
  # recorded as {job}_error and the other is still measured.
  result = {}
  for job in ("cvivit", "maskgit"):
    out = subprocess.run(cmd + [f"--jobs={job}"], capture_output=True, text=True, env=env,
                         check=False)
    if out.returncode != 0:
      result[f"{job}_error"] = out.stderr[-2000:]
      print(f"phenaki-pytorch {job} failed:\n{out.stderr[-4000:]}", file=sys.stderr)
      continue
    result.update(json.loads(out.stdout.strip().splitlines()[-1]))
  return result


def torch_spec(sizes: str) -> dict:
  """The driver's --spec: phenaki-pytorch's sizes, read off our configs of these sizes."""
  import bench_configs  # pylint: disable=g-import-not-at-top
  cv, mg, _ = bench_configs.configs(sizes)
  m, i = cv.model, cv.input
  g, j = mg.model, mg.input
  return {
      "cvivit": {"batch": i.batch_size, "frames": i.num_frames, "resolution": i.resolution,
                 "dim": m.width, "codebook_size": m.codebook_size, "patch": m.patch_size,
                 "temporal_patch": m.temporal_patch_size, "spatial_depth": m.spatial_depth,
                 "temporal_depth": m.temporal_depth, "heads": m.num_heads,
                 "dim_head": m.head_dim},
      "maskgit": {"batch": j.batch_size, "grid": list(g.token_grid),
                  "num_codes": g.codebook_size, "dim": g.width, "depth": g.num_layers,
                  "heads": g.num_heads, "dim_head": g.head_dim,
                  "text_len": bench_configs.TEXT_LEN[sizes],
                  "text_dim": bench_configs.TEXT_WIDTH[sizes]},
  }


def reference_configs(sizes: str = "reference"):
  """(C-ViViT config, MaskGIT config, its tokenizer config) at these sizes (bench_configs.py)."""
  import bench_configs  # pylint: disable=g-import-not-at-top
  return bench_configs.configs(sizes)


def run_ours(steps: int, warmup: int, sizes: str = "reference") -> dict:
  import _timing  # pylint: disable=g-import-not-at-top
  import bench_configs  # pylint: disable=g-import-not-at-top
  cv, mg, tok = reference_configs(sizes)
  out = {}
  for name, make in (("cvivit", lambda: _timing.cvivit_step(cv)),
                     ("maskgit", lambda: _timing.maskgit_step(
                         mg, tok, input_mode="codes", text_width=bench_configs.TEXT_WIDTH[sizes]))):
    step = make()
    compiled = _timing.compile_step(step)
    times, _ = _timing.time_step(step, steps, warmup)
    summary = _timing.summarize(step, times, compiled, donated=True)
    out[f"{name}_step_s"] = statistics.median(times)
    out[f"{name}_steps_s"] = times
    out[f"{name}_compile_s"] = compiled["compile_s"]
    out[f"{name}_params"] = step.num_params
    out[f"{name}_analytic_flops"] = step.flops
    out[f"{name}_xla_flops"] = compiled["xla_flops"]
    out[f"{name}_mfu"] = summary["mfu"]
    out[f"{name}_peak_memory_bytes"] = compiled.get("peak_memory_bytes")
  out["ours_settings"] = {
      "cvivit_dtype": cv.model.dtype, "maskgit_dtype": mg.model.dtype,
      "param_dtype": cv.model.param_dtype, "attention_impl": cv.model.attention_impl or "auto",
      "cvivit_batch": cv.input.batch_size, "maskgit_batch": mg.input.batch_size,
      "text_len": bench_configs.TEXT_LEN[sizes], "text_width": bench_configs.TEXT_WIDTH[sizes]}
  return out


def describe_sizes(sizes: str) -> str:
  """One line per model: the sizes both sides run (bench_configs.py)."""
  spec = torch_spec(sizes)
  c, g = spec["cvivit"], spec["maskgit"]
  grid = g["grid"]
  tokens = grid[0] * grid[1] * grid[2]
  return (f"  sizes '{sizes}':\n"
          f"    C-ViViT  batch {c['batch']}, {c['frames']}×{c['resolution']}×{c['resolution']}, "
          f"patch {c['patch']}, temporal patch {c['temporal_patch']}, width {c['dim']}, "
          f"{c['heads']}×{c['dim_head']} heads, depth {c['spatial_depth']}+"
          f"{c['temporal_depth']}, {c['codebook_size']} codes, L2 + VQ\n"
          f"    MaskGIT  batch {g['batch']}, {tokens} tokens ({'×'.join(map(str, grid))}), "
          f"{g['num_codes']} codes, width {g['dim']}, depth {g['depth']}, {g['heads']}×"
          f"{g['dim_head']} heads, {g['text_len']} text embeddings of width {g['text_dim']}")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  parser.add_argument("--steps", type=int, default=6, help="timed steps (median)")
  parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
  parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
  parser.add_argument("--ours-only", action="store_true", help="run phenaki_jax only")
  parser.add_argument("--json", action="store_true", help="print one JSON line")
  parser.add_argument("--sizes", choices=("reference", "gpu", "tiny"), default="reference",
                      help="bench_configs.py sizes: 'reference' (STACK.md, CPU), 'gpu' (the "
                      "paper's tokenizer + a ~300M generator, bf16), 'tiny' (smoke tests)")
  t = parser.add_argument_group("phenaki-pytorch (the torch side)")
  t.add_argument("--torch_device", choices=("cpu", "cuda"), default="cpu")
  t.add_argument("--torch_amp", choices=("auto", "none", "bf16"), default="auto",
                 help="autocast dtype; auto: bf16 on cuda, none (float32) on cpu")
  t.add_argument("--torch_tf32", action=argparse.BooleanOptionalAction, default=None,
                 help="TF32 matmuls/convolutions (default: on for cuda)")
  t.add_argument("--torch_fused_adamw", action=argparse.BooleanOptionalAction, default=None,
                 help="AdamW(fused=True) (default: on for cuda)")
  t.add_argument("--torch_compile", action="store_true", help="torch.compile the models")
  t.add_argument("--torch_python", default="",
                 help="an interpreter that has torch (e.g. a GPU image's python3); no venv")
  t.add_argument("--torch_pythonpath", default="",
                 help="PYTHONPATH for --torch_python (phenaki-pytorch installed with --target)")
  t.add_argument("--torch_venv", default="",
                 help=f"venv to make/use (default {os.path.relpath(VENV, REPO)} on cpu, "
                 f"{os.path.relpath(CUDA_VENV, REPO)} on cuda)")
  t.add_argument("--torch_version", default="2.11.0",
                 help="torch version of a CUDA venv (cpu: the local wheel, " + TORCH + ")")
  t.add_argument("--torch_index_url", default="",
                 help="pip --index-url for a CUDA venv's torch (default: the configured index)")
  t.add_argument("--torch_dry_run", action="store_true",
                 help="print the venv's pip commands and the driver's command, then stop")
  args = parser.parse_args()

  if args.torch_dry_run:
    venv = args.torch_venv or (VENV if args.torch_device == "cpu" else CUDA_VENV)
    if args.torch_python:
      print(f"# --torch_python={args.torch_python}: no venv is made")
    else:
      print(f"# {venv}: made only if it cannot already import torch and phenaki_pytorch")
      for cmd in venv_commands(venv, args.torch_device, args.torch_version, args.torch_index_url):
        print(" ".join(shlex.quote(c) for c in cmd))
    py = args.torch_python or venv_python(venv)
    env = f"PYTHONPATH={shlex.quote(args.torch_pythonpath)} " if args.torch_pythonpath else ""
    print(env + " ".join(shlex.quote(c) for c in driver_command(py, args, torch_spec(args.sizes))))
    print(describe_sizes(args.sizes))
    return

  import _timing  # pylint: disable=g-import-not-at-top
  if not args.json:
    print(describe_sizes(args.sizes), flush=True)
  theirs = {}
  if not args.ours_only:
    # Before anything here starts JAX's backend: on a GPU, JAX takes most of the
    # device's memory when it starts, and torch runs in a subprocess.
    theirs = run_theirs(args.steps, args.warmup, args.threads, args, torch_spec(args.sizes))
  result = dict(_timing.header(), sizes=args.sizes)
  result.update({f"phenaki_pytorch_{k}": v for k, v in theirs.items()})
  ours = run_ours(args.steps, args.warmup, args.sizes)
  result.update(ours)
  result["settings"] = {"steps": args.steps, "warmup": args.warmup, "sizes": args.sizes,
                        "ours": ours["ours_settings"]}
  if not args.ours_only:
    result["settings"]["torch"] = torch_settings(args)
    for job in ("cvivit", "maskgit"):
      # > 1: ours is faster.
      if f"phenaki_pytorch_{job}_step_s" in result:
        result[f"{job}_speedup"] = (result[f"phenaki_pytorch_{job}_step_s"]
                                    / ours[f"{job}_step_s"])
  if args.json:
    print(json.dumps(result))
    return
  print(f"{result['command']}\n  device {result['device']}, {result['date']}, load average "
        f"{result['load_average']:.2f}")
  for job in ("cvivit", "maskgit"):
    line = f"  {job:8} phenaki_jax {ours[f'{job}_step_s']:.3f} s/step (compile " \
           f"{ours[f'{job}_compile_s']:.1f} s, {ours[f'{job}_params'] / 1e6:.2f}M params)"
    if f"{job}_speedup" in result:
      line += (f" | phenaki-pytorch {result[f'phenaki_pytorch_{job}_step_s']:.3f} s/step "
               f"({result[f'phenaki_pytorch_{job}_params'] / 1e6:.2f}M params, torch "
               f"{result['phenaki_pytorch_torch']}, {result['phenaki_pytorch_threads']} threads)"
               f" | ratio pytorch/ours {result[f'{job}_speedup']:.2f}×")
    print(line)
  if not args.ours_only:
    print(f"  torch settings {result['settings']['torch']}")


if __name__ == "__main__":
  main()
