import os

# Tests run on the CPU with float32 defaults unless a test opts into float64 locally.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
