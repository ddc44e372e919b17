"""GPU compiler flags the library sets by default, where a measurement showed they help (bench/RESULTS.md).

XLA reads ``XLA_FLAGS`` once, when the first backend starts, so these are merged into the environment when
``dso_jax`` is imported (before any computation). A flag the user already sets in ``XLA_FLAGS`` wins; setting
``DSO_JAX_NO_XLA_DEFAULTS=1`` turns the defaults off entirely (the benches use it to time the plain defaults).
The flags only concern the GPU backend; CPU and TPU runs ignore them.
"""

from __future__ import annotations

import os

# flag -> value. Each entry names the measurement that justifies it (bench/RESULTS.md, "Speed").
DEFAULTS: dict[str, str] = {
    # cuBLAS instead of Triton GEMMs: the SS-flow forward at B = 8 took 92.8 ms against 98.9 ms with Triton GEMMs
    # (issue 14's measurement); re-measured in "Speed: stage 1 against torch.compile" (jax:library vs jax:default).
    "--xla_gpu_enable_triton_gemm": "false",
}


def merged(existing: str, defaults: dict[str, str]) -> str:
    """``existing`` plus every default whose flag it does not already set."""
    present = {tok.split("=", 1)[0] for tok in existing.split()}
    extra = [f"{k}={v}" for k, v in defaults.items() if k not in present]
    return " ".join([existing.strip()] + extra).strip()


def apply(environ=os.environ) -> None:
    """Merge :data:`DEFAULTS` into ``environ['XLA_FLAGS']`` unless ``DSO_JAX_NO_XLA_DEFAULTS`` is set."""
    if environ.get("DSO_JAX_NO_XLA_DEFAULTS", "") not in ("", "0"):
        return
    if DEFAULTS:
        environ["XLA_FLAGS"] = merged(environ.get("XLA_FLAGS", ""), DEFAULTS)
