"""The library's XLA defaults: merged under the user's own flags, switchable off, applied at import."""

import os
import subprocess
import sys

from dso_jax import xla_flags


def test_user_flags_win_and_defaults_are_added():
    defaults = {"--a": "1", "--b": "2"}
    assert xla_flags.merged("--a=0 --c", defaults) == "--a=0 --c --b=2"
    assert xla_flags.merged("", defaults) == "--a=1 --b=2"


def test_apply_respects_the_off_switch():
    env = {"DSO_JAX_NO_XLA_DEFAULTS": "1", "XLA_FLAGS": "--x"}
    xla_flags.apply(env)
    assert env["XLA_FLAGS"] == "--x"
    env = {"XLA_FLAGS": "--xla_gpu_enable_triton_gemm=true"}
    xla_flags.apply(env)
    assert env["XLA_FLAGS"].split()[0] == "--xla_gpu_enable_triton_gemm=true"
    assert all(flag in env["XLA_FLAGS"] for flag in xla_flags.DEFAULTS)


def test_importing_dso_jax_sets_the_defaults_for_the_process():
    code = "import os, dso_jax; print(os.environ.get('XLA_FLAGS', ''))"
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "DSO_JAX_NO_XLA_DEFAULTS")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == [f"{k}={v}" for k, v in xla_flags.DEFAULTS.items()]
