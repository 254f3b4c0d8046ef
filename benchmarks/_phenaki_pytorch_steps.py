"""Times lucidrains' phenaki-pytorch train steps; run by benchmarks/side_by_side.py.

Runs under the interpreter of benchmarks/.venv-phenaki-pytorch (torch CPU,
phenaki-pytorch 0.5.0), never under ours. Prints one JSON line:
  {"cvivit_step_s": median, "cvivit_steps_s": [...], "maskgit_step_s": ..., ...}

Only phenaki-pytorch's model code is driven. Its package __init__ also imports
its trainers, whose data / logging / T5 dependencies (torchvision, OpenCV,
accelerate, transformers) are not installed: the measured path does not touch
them (VGG and the GAN are off, codes and text embeddings are given), so they
are replaced by empty placeholder modules before the import.

Steps, at the sizes of STACK.md ('Reference speed of the nearest peer'):
  cvivit   CViViT(dim 256, 4×64 heads, depth 2+2, 8192 codes, patch 8,
           temporal patch 2, use_vgg_and_gan=False) on (4, 3, 11, 64, 64):
           forward (its loss: reconstruction MSE; with the GAN off it returns
           neither the VQ commitment term nor anything else, and its codebook
           learns by EMA inside forward), backward, AdamW step.
  maskgit  MaskGit(dim 256, depth 4, 4×64 heads, 8192 codes, 384 tokens as a
           6×8×8 grid, cross-attention to 16 text embeddings of width 512):
           Phenaki's training recipe (cosine-schedule masking, cross-entropy on
           the masked tokens), backward, AdamW step.
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


def _time(step, steps: int, warmup: int) -> list[float]:
  for _ in range(warmup):
    step()
  out = []
  for _ in range(steps):
    t0 = time.perf_counter()
    step()
    out.append(time.perf_counter() - t0)
  return out


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--steps", type=int, default=6)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--threads", type=int, default=2)
  parser.add_argument("--jobs", default="cvivit,maskgit")
  args = parser.parse_args()

  _install_placeholders()
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  from phenaki_pytorch.cvivit import CViViT  # pylint: disable=g-import-not-at-top
  from phenaki_pytorch.phenaki_pytorch import MaskGit, get_mask_subset_with_prob  # pylint: disable=g-import-not-at-top

  torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  out = {"torch": torch.__version__, "threads": torch.get_num_threads()}
  jobs = args.jobs.split(",")

  if "cvivit" in jobs:
    model = CViViT(dim=256, codebook_size=8192, image_size=64, patch_size=8,
                   temporal_patch_size=2, spatial_depth=2, temporal_depth=2, dim_head=64,
                   heads=4, use_vgg_and_gan=False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    video = torch.rand(4, 3, 11, 64, 64) * 2 - 1

    def cvivit_step():
      opt.zero_grad(set_to_none=True)
      loss = model(video)
      loss.backward()
      opt.step()

    times = _time(cvivit_step, args.steps, args.warmup)
    out.update(cvivit_step_s=statistics.median(times), cvivit_steps_s=times,
               cvivit_params=sum(p.numel() for p in model.parameters()))

  if "maskgit" in jobs:
    num_codes, grid, text_len, text_dim = 8192, (6, 8, 8), 16, 512
    maskgit = MaskGit(dim=256, num_tokens=num_codes, max_seq_len=math.prod(grid), depth=4,
                      heads=4, dim_head=64, dim_context=text_dim)
    opt = torch.optim.AdamW(maskgit.parameters(), lr=1e-4)
    codes = torch.randint(0, num_codes, (4,) + grid)
    text = torch.randn(4, text_len, text_dim)
    text_mask = torch.ones(4, text_len, dtype=torch.bool)

    def maskgit_step():
      # Phenaki.forward's generator part, without its T5 and tokenizer.
      flat = codes.reshape(4, -1)
      steps = 18
      rand_step = torch.randint(0, steps, (4,))
      prob = torch.cos(rand_step * math.pi * 0.5 / steps)
      masked = get_mask_subset_with_prob(torch.ones_like(flat, dtype=torch.bool), prob)
      inputs = torch.where(masked, maskgit.mask_id, flat).reshape(codes.shape)
      opt.zero_grad(set_to_none=True)
      logits = maskgit(inputs, text_mask=text_mask, context=text)
      loss = F.cross_entropy(logits[masked], flat[masked])
      loss.backward()
      opt.step()

    times = _time(maskgit_step, args.steps, args.warmup)
    out.update(maskgit_step_s=statistics.median(times), maskgit_steps_s=times,
               maskgit_params=sum(p.numel() for p in maskgit.parameters()))
  print(json.dumps(out))


if __name__ == "__main__":
  main()
