"""Times lucidrains' phenaki-pytorch train steps; run by benchmarks/side_by_side.py.

Runs under the interpreter of a phenaki-pytorch environment (by default
benchmarks/.venv-phenaki-pytorch: torch CPU, phenaki-pytorch 0.5.0), never under
ours. Prints one JSON line:
  {"cvivit_step_s": median, "cvivit_steps_s": [...], "maskgit_step_s": ..., ...,
   "settings": {...}}

Only phenaki-pytorch's model code is driven. Its package __init__ also imports
its trainers, whose data / logging / T5 dependencies (torchvision, OpenCV,
accelerate, transformers) are not needed: the measured path does not touch
them (VGG and the GAN are off, codes and text embeddings are given), so they
are replaced by empty placeholder modules before the import.

Steps, at the sizes of --spec (a JSON object made by side_by_side.py from
benchmarks/bench_configs.py; the default is STACK.md's reference):
  cvivit   CViViT(dim, heads×dim_head, spatial+temporal depth, codebook, patch,
           temporal patch, use_vgg_and_gan=False) on (B, 3, T, H, W): forward
           (its loss: reconstruction MSE; with the GAN off it returns neither
           the VQ commitment term nor anything else), backward, AdamW step.
  maskgit  MaskGit(dim, depth, heads×dim_head, codes, a (t, h, w) token grid,
           cross-attention to text embeddings): Phenaki's training recipe
           (cosine-schedule masking, cross-entropy on the masked tokens),
           backward, AdamW step.

Modes (--device=cuda): --amp=bf16 runs forward and loss under
torch.autocast(bfloat16) (float32 weights and AdamW, as ours); --tf32 lets
float32 matmuls and convolutions use TF32; --fused_adamw uses AdamW's fused CUDA
kernel; cudnn.benchmark is on; --compile wraps the model in torch.compile
(warm-up steps then include the compile). The GPU clock is read around each
step with torch.cuda.synchronize() on both sides of the timed region.
"""
from __future__ import annotations

import argparse
import importlib.abc
import importlib.machinery
import json
import math
import statistics
import sys
import time
import types

_PLACEHOLDERS = ("torchvision", "cv2", "accelerate", "transformers")


class _Anything(types.ModuleType):
  """A module whose every attribute is another placeholder (and callable)."""

  def __getattr__(self, name):
    if name.startswith("__"):
      raise AttributeError(name)
    return _Anything(f"{self.__name__}.{name}")

  def __call__(self, *args, **kwargs):
    return _Anything(f"{self.__name__}()")


class _PlaceholderFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):

  def find_spec(self, fullname, path, target=None):
    if fullname.split(".")[0] in _PLACEHOLDERS:
      return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
    return None

  def create_module(self, spec):
    module = _Anything(spec.name)
    module.__path__ = []
    return module

  def exec_module(self, module):
    pass


def _install_placeholders() -> None:
  for name in _PLACEHOLDERS:
    try:
      __import__(name)
      continue  # the real one is installed
    except ImportError:
      pass
  sys.meta_path.insert(0, _PlaceholderFinder())


REFERENCE_SPEC = {
    "cvivit": {"batch": 4, "frames": 11, "resolution": 64, "dim": 256, "codebook_size": 8192,
               "patch": 8, "temporal_patch": 2, "spatial_depth": 2, "temporal_depth": 2,
               "heads": 4, "dim_head": 64},
    "maskgit": {"batch": 4, "grid": [6, 8, 8], "num_codes": 8192, "dim": 256, "depth": 4,
                "heads": 4, "dim_head": 64, "text_len": 16, "text_dim": 512},
}


def _time(step, steps: int, warmup: int, sync) -> list[float]:
  for _ in range(warmup):
    step()
  sync()
  out = []
  for _ in range(steps):
    sync()
    t0 = time.perf_counter()
    step()
    sync()
    out.append(time.perf_counter() - t0)
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description="phenaki-pytorch train steps (one JSON line)")
  parser.add_argument("--steps", type=int, default=6)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
  parser.add_argument("--jobs", default="cvivit,maskgit")
  parser.add_argument("--spec", default="", help="JSON sizes (default: STACK.md's reference)")
  parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
  parser.add_argument("--amp", choices=("none", "bf16"), default="none",
                      help="torch.autocast(bfloat16) around forward + loss")
  parser.add_argument("--tf32", action="store_true", help="TF32 float32 matmuls / convolutions")
  parser.add_argument("--fused_adamw", action="store_true", help="AdamW(fused=True) (CUDA)")
  parser.add_argument("--compile", action="store_true", help="torch.compile the model")
  parser.add_argument("--dry_run", action="store_true",
                      help="parse the arguments, print the settings as JSON, import nothing")
  parser.add_argument("--check_import", action="store_true",
                      help="import torch and phenaki-pytorch's model code, print versions, stop")
  args = parser.parse_args()
  spec = json.loads(args.spec) if args.spec else REFERENCE_SPEC
  settings = {"device": args.device, "amp": args.amp, "tf32": args.tf32,
              "fused_adamw": args.fused_adamw, "compile": args.compile, "threads": args.threads,
              "spec": spec}
  if args.dry_run:
    print(json.dumps({"settings": settings}))
    return

  _install_placeholders()
  if args.check_import:
    import torch  # pylint: disable=g-import-not-at-top
    import phenaki_pytorch.cvivit  # pylint: disable=g-import-not-at-top,unused-import
    import phenaki_pytorch.phenaki_pytorch  # pylint: disable=g-import-not-at-top,unused-import
    print(json.dumps({"torch": torch.__version__, "cuda": torch.cuda.is_available()}))
    return
  import contextlib  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  from phenaki_pytorch.cvivit import CViViT  # pylint: disable=g-import-not-at-top
  from phenaki_pytorch.phenaki_pytorch import MaskGit, get_mask_subset_with_prob  # pylint: disable=g-import-not-at-top

  torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  device = torch.device(args.device)
  if args.device == "cuda":
    if not torch.cuda.is_available():
      raise SystemExit(f"--device=cuda, but torch {torch.__version__} sees no CUDA device")
    torch.backends.cudnn.benchmark = True
    sync = torch.cuda.synchronize
  else:
    sync = lambda: None
  torch.backends.cuda.matmul.allow_tf32 = args.tf32
  torch.backends.cudnn.allow_tf32 = args.tf32
  if args.tf32:
    torch.set_float32_matmul_precision("high")

  def autocast():
    if args.amp == "bf16":
      return torch.autocast(device_type=args.device, dtype=torch.bfloat16)
    return contextlib.nullcontext()

  def optimizer(model):
    kw = {"fused": True} if args.fused_adamw and args.device == "cuda" else {}
    return torch.optim.AdamW(model.parameters(), lr=1e-4, **kw)

  def maybe_compile(model):
    return torch.compile(model) if args.compile else model

  out = {"torch": torch.__version__, "threads": torch.get_num_threads(), "settings": settings}
  if args.device == "cuda":
    out["cuda_device"] = torch.cuda.get_device_name(0)
  jobs = args.jobs.split(",")

  if "cvivit" in jobs:
    c = spec["cvivit"]
    model = CViViT(dim=c["dim"], codebook_size=c["codebook_size"], image_size=c["resolution"],
                   patch_size=c["patch"], temporal_patch_size=c["temporal_patch"],
                   spatial_depth=c["spatial_depth"], temporal_depth=c["temporal_depth"],
                   dim_head=c["dim_head"], heads=c["heads"], use_vgg_and_gan=False).to(device)
    opt = optimizer(model)
    params = sum(p.numel() for p in model.parameters())
    run = maybe_compile(model)
    video = torch.rand(c["batch"], 3, c["frames"], c["resolution"], c["resolution"],
                       device=device) * 2 - 1

    def cvivit_step():
      opt.zero_grad(set_to_none=True)
      with autocast():
        loss = run(video)
      loss.backward()
      opt.step()

    times = _time(cvivit_step, args.steps, args.warmup, sync)
    out.update(cvivit_step_s=statistics.median(times), cvivit_steps_s=times,
               cvivit_params=params)
    if args.device == "cuda":
      out["cvivit_peak_memory_bytes"] = torch.cuda.max_memory_allocated()
    del model, opt, run, video

  if "maskgit" in jobs:
    c = spec["maskgit"]
    b, num_codes, grid = c["batch"], c["num_codes"], tuple(c["grid"])
    maskgit = MaskGit(dim=c["dim"], num_tokens=num_codes, max_seq_len=math.prod(grid),
                      depth=c["depth"], heads=c["heads"], dim_head=c["dim_head"],
                      dim_context=c["text_dim"]).to(device)
    opt = optimizer(maskgit)
    params = sum(p.numel() for p in maskgit.parameters())
    run = maybe_compile(maskgit)
    codes = torch.randint(0, num_codes, (b,) + grid, device=device)
    text = torch.randn(b, c["text_len"], c["text_dim"], device=device)
    text_mask = torch.ones(b, c["text_len"], dtype=torch.bool, device=device)

    def maskgit_step():
      # Phenaki.forward's generator part, without its T5 and tokenizer.
      flat = codes.reshape(b, -1)
      steps = 18
      rand_step = torch.randint(0, steps, (b,), device=device)
      prob = torch.cos(rand_step * math.pi * 0.5 / steps)
      masked = get_mask_subset_with_prob(torch.ones_like(flat, dtype=torch.bool), prob)
      inputs = torch.where(masked, maskgit.mask_id, flat).reshape(codes.shape)
      opt.zero_grad(set_to_none=True)
      with autocast():
        logits = run(inputs, text_mask=text_mask, context=text)
        loss = F.cross_entropy(logits[masked].float(), flat[masked])
      loss.backward()
      opt.step()

    if args.device == "cuda":
      torch.cuda.reset_peak_memory_stats()
    times = _time(maskgit_step, args.steps, args.warmup, sync)
    out.update(maskgit_step_s=statistics.median(times), maskgit_steps_s=times,
               maskgit_params=params)
    if args.device == "cuda":
      out["maskgit_peak_memory_bytes"] = torch.cuda.max_memory_allocated()
  print(json.dumps(out))


if __name__ == "__main__":
  main()
