"""phenaki_jax: Phenaki-style text-to-video models in JAX/Flax."""
import os as _os

# gs:// through fsspec's gcsfs, not TensorFlow's GCS client (see storage.py):
# must be set before etils first picks a backend.
_os.environ.setdefault("EPATH_USE_TF", "false")
