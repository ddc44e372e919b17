"""dso_jax: DSO (simulation-feedback alignment of TRELLIS stage 1) in JAX/Flax."""

__version__ = "0.1.0"
