"""The benchmarks' fixed sizes, as ml_collections config files.

  python benchmarks/train_step.py --job=maskgit --config=benchmarks/bench_configs.py:gpu,maskgit \
      --tokenizer_config=benchmarks/bench_configs.py:gpu,cvivit
  python benchmarks/train_step.py --job=cvivit --config=benchmarks/bench_configs.py:gpu,cvivit_full
  python benchmarks/sampling.py --config=benchmarks/bench_configs.py:gpu,maskgit

The argument is SIZES,JOB (the grammar of phenaki_jax/config/args.py; sizes from
phenaki_jax/config/sizes.py):

SIZES
  reference  the sizes of STACK.md's 'Reference speed of the nearest peer' (the
             2-core CPU side-by-side with phenaki-pytorch; float32).
  gpu        issue 11's GPU sizes: the paper's tokenizer and a ~300M-parameter
             generator, bf16 compute (float32 master weights), one device.
  tiny       seconds on a CPU: the same code paths, for smoke tests only.

JOB
  cvivit       the tokenizer with the side-by-side objective, L2 + VQ (no LPIPS /
               I3D / GAN: phenaki-pytorch's use_vgg_and_gan=False).
  cvivit_full  the same tokenizer with the paper's full objective (GAN from
               step 0 with lazy R1, LPIPS-VGG16 on one frame per clip, I3D
               Mixed_4f on every clip; configs/cvivit.py:paper's loss).
  maskgit      the generator on that tokenizer's token grid (8,192 codes),
               cross-attending to TEXT_LEN cached text embeddings of width
               TEXT_WIDTH (benchmarks pass the embeddings in the batch:
               --maskgit_input=codes), byte-level text encoder for sampling.

GPU sizes (printed by side_by_side.py --sizes=gpu, parameters counted there):
  tokenizer  configs/cvivit.py:paper: batch 8 clips of 11×128×128, patch 8×8,
             temporal patch 2 → 6×16×16 = 1,536 tokens per clip, width 512,
             8×64 heads, MLP 2,048, depth 4 spatial + 4 temporal per side,
             8,192 codes of dim 32: 51.6M parameters (phenaki-pytorch's CViViT
             at the same sizes: see side_by_side.py's printout).
  generator  batch 16 × 1,536 tokens (6×16×16) of 8,192 codes, width 1,024,
             17 blocks of self-attention (16×64 heads) + cross-attention to 64
             text embeddings of width 512 + MLP 4,096: 303M parameters.
Both: model.dtype bfloat16 (float32 params, gradients and optimizer state),
attention_impl '' (cuDNN's fused kernel where it applies, else XLA), one
device (gpu_suite.sh sets CUDA_VISIBLE_DEVICES=0).
"""
from __future__ import annotations

import importlib.util
import os

from phenaki_jax.config import args
from phenaki_jax.config import sizes as size_table

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SIZES = ("reference", "tiny", "gpu")
JOBS = ("cvivit", "cvivit_full", "maskgit")

# The cached text embeddings the generator cross-attends to (train step, side-by-side).
TEXT_LEN = {"reference": 16, "gpu": 64, "tiny": 4}
TEXT_WIDTH = {"reference": 512, "gpu": 512, "tiny": 8}
# (num_frames, resolution) of the clips each size runs on.
_CLIPS = {"reference": (11, 64), "tiny": (3, 16), "gpu": (11, 128)}


def _load(job: str, variant: str = ""):
  path = os.path.join(REPO, "configs", f"{job}.py")
  spec = importlib.util.spec_from_file_location(f"configs_{job}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant).copy_and_resolve_references()  # unlocked


def _cvivit(sizes: str, full: bool):
  if sizes == "gpu":
    cv = _load("cvivit", "paper")
    cv.input.batch_size = 8
  else:
    cv = _load("cvivit")
    cv.input.batch_size = 4 if sizes == "reference" else 2
    cv.input.num_frames, cv.input.resolution = _CLIPS[sizes]
    cv.model.update(size_table.BENCH_TOKENIZER[sizes])
  if full:
    # The paper's objective from step 0 (configs/cvivit.py:paper's loss and GAN).
    paper = _load("cvivit", "paper")
    cv.loss = paper.loss
    cv.gan = paper.gan
    if sizes == "tiny":
      cv.input.num_frames, cv.input.resolution = 9, 32  # I3D's stem needs a few frames
      cv.gan.base_features, cv.gan.channel_multipliers = 8, (1, 2)
      cv.loss.video_perceptual_clips = 1
  else:
    cv.loss.lpips_weight = cv.loss.video_perceptual_weight = cv.loss.adversarial_weight = 0.0
  return cv


def _maskgit(sizes: str):
  mg = _load("maskgit")
  mg.input.batch_size = {"reference": 4, "tiny": 2, "gpu": 16}[sizes]
  mg.input.num_frames, mg.input.resolution = _CLIPS[sizes]
  mg.model.update(size_table.generator_model(
      size_table.BENCH_TOKENIZER[sizes], _CLIPS[sizes], size_table.BENCH_GENERATOR[sizes]))
  if sizes == "gpu":
    mg.model.dtype = "bfloat16"
    mg.text.dtype = "bfloat16"
  if sizes == "tiny":
    mg.input.story_context_frames = (1,)
    mg.text.byte_encoder.update(size_table.BENCH_BYTE_ENCODER["tiny"])
  mg.text.max_length = TEXT_LEN[sizes]
  mg.tokenizer.workdir = "(random weights: the benchmark loads no checkpoint)"
  return mg


def configs(sizes: str):
  """(C-ViViT config (L2 + VQ), MaskGIT config, the MaskGIT's tokenizer config)."""
  if sizes not in SIZES:
    raise ValueError(f"sizes {sizes!r}: expected one of {SIZES}")
  cv = _cvivit(sizes, full=False)
  return cv, _maskgit(sizes), cv.copy_and_resolve_references()


def get_config(arg: str = "reference,cvivit"):
  try:
    arg = args.parse_arg(arg, "benchmarks/bench_configs.py", sizes=args.OneOf(*SIZES),
                         job=args.OneOf(*JOBS))
  except ValueError:
    raise ValueError(f"benchmarks/bench_configs.py:{arg!r}: expected SIZES,JOB with SIZES in "
                     f"{SIZES} and JOB in {JOBS}") from None
  sizes, job = arg.sizes, arg.job
  if job == "maskgit":
    return _maskgit(sizes)
  if sizes == "gpu" and job == "cvivit_full":
    cv = _cvivit(sizes, full=True)
    cv.input.batch_size = 16
    return cv
  return _cvivit(sizes, full=job == "cvivit_full")
