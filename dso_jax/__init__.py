"""dso_jax: DSO (simulation-feedback alignment of TRELLIS stage 1) in JAX/Flax."""

from dso_jax import xla_flags as _xla_flags

__version__ = "0.1.0"

_xla_flags.apply()  # the library's GPU compiler defaults, before any backend starts (dso_jax/xla_flags.py)
