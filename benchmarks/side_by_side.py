"""phenaki_jax vs lucidrains' phenaki-pytorch: train-step time at the same sizes.

  python benchmarks/side_by_side.py [--steps=6 --warmup=2 --threads=2]
  python benchmarks/side_by_side.py --ours-only --json     # one JSON line, ours only

Sizes (STACK.md, 'Reference speed of the nearest peer'):
  C-ViViT  batch 4, 11×64×64 clips, patch 8, temporal patch 2, width 256,
           4×64 heads, depth 2 spatial + 2 temporal, 8,192 codes, loss
           reconstruction + VQ only (no LPIPS / I3D / GAN), AdamW.
  MaskGIT  batch 4, 384 tokens (6×8×8), 8,192 codes, width 256, depth 4,
           4×64 heads, MLP 1024, cross-attention to 16 text embeddings of
           width 512, AdamW.

phenaki-pytorch 0.5.0 runs in its own virtualenv, benchmarks/.venv-phenaki-pytorch
(made on first use: torch 2.13.0 CPU from the local wheel, the package and its
model-code dependencies with --no-deps where pip would pull CUDA wheels), with
`--threads` torch threads; benchmarks/_phenaki_pytorch_steps.py drives it.
Ours runs in this process through the trainers' own steps (benchmarks/_timing.py),
in the same run, so the ratio is of two measurements under the same load.
Differences that remain: theirs skips its VQ commitment loss with the GAN off
and learns its codebook by EMA (ours: codebook + commitment losses, 32-dim
l2-normalised lookup, dead-code restarts, EMA of the weights); theirs adds
continuous position-bias MLPs and PEG convolutions; ours counts the masked-token
loss, bucket metrics and a non-finite-step guard. Both are what the users run.
Not a test: figures go to benchmarks/RESULTS.md with the command, machine and date.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, REPO)

VENV = os.path.join(HERE, ".venv-phenaki-pytorch")
PHENAKI_PYTORCH = "phenaki-pytorch==0.5.0"
TORCH = "torch==2.13.0"  # the CPU wheel in the local wheel folder (see setup.py's test extra)
# Imported by phenaki-pytorch's model code; pip's resolver would pull CUDA
# torch/torchvision for the package itself, so it goes in with --no-deps and
# these go in next to the CPU torch (its trainers' torchvision / OpenCV /
# accelerate / transformers are never imported on the timed path).
MODEL_DEPS = ["einops>=0.7", "beartype", "ema-pytorch>=0.2.2", "vector-quantize-pytorch>=1.11.8",
              "torchtyping", "numpy", "pillow", "tqdm", "typing_extensions", "filelock", "sympy",
              "networkx", "jinja2", "fsspec"]


def venv_python() -> str:
  return os.path.join(VENV, "bin", "python")


def ensure_phenaki_pytorch() -> str:
  """The venv's python, made and filled on first use."""
  py = venv_python()
  ok = os.path.exists(py) and subprocess.run(
      [py, "-c", "import torch, vector_quantize_pytorch, phenaki_pytorch.cvivit"],
      capture_output=True, env={**os.environ, "PYTHONPATH": HERE}).returncode == 0
  if ok:
    return py
  # phenaki_pytorch/__init__ imports its trainers: check the model modules only.
  print(f"making {VENV} (phenaki-pytorch, torch CPU) ...", file=sys.stderr)
  subprocess.run([sys.executable, "-m", "venv", VENV], check=True)
  pip = [py, "-m", "pip", "install", "-q"]
  subprocess.run(pip + ["--no-deps", TORCH], check=True)
  subprocess.run(pip + ["--no-deps", PHENAKI_PYTORCH], check=True)
  subprocess.run(pip + MODEL_DEPS, check=True)
  return py


def run_theirs(steps: int, warmup: int, threads: int) -> dict:
  py = ensure_phenaki_pytorch()
  env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
  out = subprocess.run([py, os.path.join(HERE, "_phenaki_pytorch_steps.py"), f"--steps={steps}",
                        f"--warmup={warmup}", f"--threads={threads}"],
                       capture_output=True, text=True, env=env, check=False)
  if out.returncode != 0:
    raise RuntimeError(f"phenaki-pytorch steps failed:\n{out.stderr[-4000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def reference_configs(sizes: str = "reference"):
  """(C-ViViT config, MaskGIT config, its tokenizer config) at the STACK.md sizes."""
  from tests.helpers import load_config  # pylint: disable=g-import-not-at-top
  cv = load_config("cvivit")
  cv.input.batch_size, cv.input.num_frames, cv.input.resolution = 4, 11, 64
  m = cv.model
  m.patch_size, m.temporal_patch_size, m.width, m.num_heads, m.head_dim = 8, 2, 256, 4, 64
  m.mlp_dim, m.spatial_depth, m.temporal_depth, m.codebook_size = 1024, 2, 2, 8192
  cv.loss.lpips_weight = cv.loss.video_perceptual_weight = cv.loss.adversarial_weight = 0.0
  mg = load_config("maskgit")
  mg.input.batch_size, mg.input.num_frames, mg.input.resolution = 4, 11, 64
  g = mg.model
  g.codebook_size, g.token_grid, g.width, g.num_layers = 8192, (6, 8, 8), 256, 4
  g.num_heads, g.head_dim, g.mlp_dim = 4, 64, 1024
  mg.text.max_length = 16
  if sizes == "tiny":  # for the smoke test only: same code path, seconds to compile
    cv.input.num_frames, cv.input.resolution, cv.input.batch_size = 3, 16, 2
    m.width, m.num_heads, m.head_dim, m.mlp_dim, m.codebook_size = 32, 2, 16, 64, 64
    m.spatial_depth = m.temporal_depth = 1
    mg.input.num_frames, mg.input.resolution, mg.input.batch_size = 3, 16, 2
    mg.input.story_context_frames = (1,)
    g.codebook_size, g.token_grid, g.width, g.num_layers = 64, (2, 2, 2), 32, 1
    g.num_heads, g.head_dim, g.mlp_dim = 2, 16, 64
    mg.text.max_length = 4
  tok = cv.copy_and_resolve_references()
  return cv, mg, tok


def run_ours(steps: int, warmup: int, sizes: str = "reference") -> dict:
  import _timing  # pylint: disable=g-import-not-at-top
  cv, mg, tok = reference_configs(sizes)
  out = {}
  for name, make in (("cvivit", lambda: _timing.cvivit_step(cv)),
                     ("maskgit", lambda: _timing.maskgit_step(mg, tok, input_mode="codes",
                                                              text_width=512 if sizes != "tiny" else 8))):
    step = make()
    compiled = _timing.compile_step(step)
    times, _ = _timing.time_step(step, steps, warmup)
    out[f"{name}_step_s"] = statistics.median(times)
    out[f"{name}_steps_s"] = times
    out[f"{name}_compile_s"] = compiled["compile_s"]
    out[f"{name}_params"] = step.num_params
    out[f"{name}_analytic_flops"] = step.flops
    out[f"{name}_xla_flops"] = compiled["xla_flops"]
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=6, help="timed steps (median)")
  parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
  parser.add_argument("--threads", type=int, default=2, help="torch threads")
  parser.add_argument("--ours-only", action="store_true", help="run phenaki_jax only")
  parser.add_argument("--json", action="store_true", help="print one JSON line")
  parser.add_argument("--sizes", choices=("reference", "tiny"), default="reference",
                      help="'tiny' only for the smoke test")
  args = parser.parse_args()

  import _timing  # pylint: disable=g-import-not-at-top
  result = dict(_timing.header(), sizes=args.sizes)
  if not args.ours_only:
    theirs = run_theirs(args.steps, args.warmup, args.threads)
    result.update({f"phenaki_pytorch_{k}": v for k, v in theirs.items()})
  ours = run_ours(args.steps, args.warmup, args.sizes)
  result.update(ours)
  if not args.ours_only:
    for job in ("cvivit", "maskgit"):
      # > 1: ours is faster.
      result[f"{job}_speedup"] = result[f"phenaki_pytorch_{job}_step_s"] / ours[f"{job}_step_s"]
  if args.json:
    print(json.dumps(result))
    return
  print(f"{result['command']}\n  device {result['device']}, {result['date']}, load average "
        f"{result['load_average']:.2f}")
  for job in ("cvivit", "maskgit"):
    line = f"  {job:8} phenaki_jax {ours[f'{job}_step_s']:.3f} s/step (compile " \
           f"{ours[f'{job}_compile_s']:.1f} s, {ours[f'{job}_params'] / 1e6:.2f}M params)"
    if not args.ours_only:
      line += (f" | phenaki-pytorch {result[f'phenaki_pytorch_{job}_step_s']:.3f} s/step "
               f"({result[f'phenaki_pytorch_{job}_params'] / 1e6:.2f}M params, torch "
               f"{result['phenaki_pytorch_torch']}, {result['phenaki_pytorch_threads']} threads)"
               f" | ratio pytorch/ours {result[f'{job}_speedup']:.2f}×")
    print(line)


if __name__ == "__main__":
  main()
