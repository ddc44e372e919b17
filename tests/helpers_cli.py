"""Run a command-line entry point in-process, as its ``__main__`` does: ``sys.exit(cli.run(main))``.

``run_script(name, argv)`` loads ``scripts/NAME.py`` (or ``NAME.py`` at the repository root), sets
``sys.argv``, calls ``cli.run(main)`` and returns ``(exit status, stdout, stderr)``; argparse's own exits
are caught the same way. Used by the bad-input specs: an expected error is one line, exit 2, no traceback.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import io
import os
import sys

from dso_jax import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@functools.cache
def script_main(name: str):
    path = os.path.join(ROOT, "scripts", f"{name}.py")
    if not os.path.exists(path):
        path = os.path.join(ROOT, f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"_script_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


def run_script(name: str, argv: list[str], env_debug: bool = False) -> tuple[int, str, str]:
    main = script_main(name)
    out, err = io.StringIO(), io.StringIO()
    old_argv, old_env = sys.argv, os.environ.pop(cli.DEBUG_ENV, None)
    sys.argv = [f"{name}.py", *map(str, argv)]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = cli.run(main, prog=f"{name}.py")
            except SystemExit as e:  # argparse: usage errors and --help
                rc = e.code if isinstance(e.code, int) else 1
    finally:
        sys.argv = old_argv
        if old_env is not None:
            os.environ[cli.DEBUG_ENV] = old_env
    return rc, out.getvalue(), err.getvalue()


def error_line(err: str) -> str:
    """The one ``error:`` line of an expected failure (asserting there is exactly one and no traceback)."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    return lines[0]
