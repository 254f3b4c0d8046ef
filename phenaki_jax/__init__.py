"""phenaki_jax: Phenaki-style text-to-video models in JAX/Flax."""
