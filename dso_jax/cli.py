"""What every command-line entry point shares: expected errors as one line, a non-zero exit, no traceback.

``run(main)`` calls ``main()`` and turns the errors a user can cause (a bad config value, a missing or
unreadable file, a malformed checkpoint, a full disk) into ``error: <one line naming the file/key/shape>``
on stderr with exit status 2. A traceback is printed only when asked for: ``--debug`` on the command
line or ``DSO_JAX_DEBUG=1`` in the environment. Programming errors (anything else) keep their traceback.
"""

from __future__ import annotations

import argparse
import errno
import math
import os
import sys
from typing import Callable

from dso_jax.convert.verify import ConversionError

DEBUG_ENV = "DSO_JAX_DEBUG"
EXIT_USER_ERROR = 2

# What bad input or a bad environment raises; each message names the file, key or shape.
USER_ERRORS = (
    ValueError,
    KeyError,
    FileNotFoundError,
    FileExistsError,
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,
    ConversionError,
    OSError,
    FloatingPointError,
)


class UserError(Exception):
    """An expected failure whose message is the whole story (raised by library code for bad input)."""


def debug_requested(argv=None) -> bool:
    argv = sys.argv if argv is None else argv
    return "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0", "false", "False")


def strip_debug(argv: list[str]) -> list[str]:
    """``argv`` without ``--debug`` (for parsers that do not declare it)."""
    return [a for a in argv if a != "--debug"]


def one_line(e: BaseException) -> str:
    """The exception as one line: its message (a KeyError's key quoted), newlines folded."""
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        where = f" writing {e.filename}" if e.filename else ""
        return f"no space left on the device{where}"
    if isinstance(e, KeyError) and len(e.args) == 1:
        msg = f"missing key {e.args[0]!r}"
    elif isinstance(e, OSError) and e.filename and e.strerror:
        msg = f"{e.filename}: {e.strerror}"
    else:
        msg = str(e) or type(e).__name__
    return " | ".join(part.strip() for part in msg.splitlines() if part.strip())


def run(main: Callable[[], int | None], *, prog: str | None = None) -> int:
    """Call ``main()``; return its exit status, or print an expected error in one line and return 2."""
    debug = debug_requested()
    try:
        rc = main()
        return 0 if rc is None else int(rc)
    except (UserError, *USER_ERRORS) as e:
        if debug:
            raise
        name = prog or os.path.basename(sys.argv[0] or "dso_jax")
        print(f"{name}: error: {one_line(e)}", file=sys.stderr)
        if not isinstance(e, UserError):
            print(f"{name}: (run with --debug or {DEBUG_ENV}=1 for the traceback)", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


# ---------------------------------------------------------------------------------------------- argparse CLIs


class ArgumentParser(argparse.ArgumentParser):
    """argparse with ``--debug`` declared (read by :func:`run`) and bad flags reported in one line, exit 2."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)
        self.add_argument(
            "--debug", action="store_true", help=f"print the traceback of an error (or set {DEBUG_ENV}=1)"
        )

    def error(self, message: str):
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message} (see --help)\n")


def _number(kind, check, what):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not check(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    parse.__name__ = what
    return parse


positive_int = _number(int, lambda v: v > 0, "a positive integer")
non_negative_int = _number(int, lambda v: v >= 0, "a non-negative integer")
positive_float = _number(float, lambda v: math.isfinite(v) and v > 0, "a positive number")
non_negative_float = _number(float, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")


def check_writable_file(path: str) -> str:
    """Fail now, in one line, if ``path`` cannot be written (a folder, a file as its parent, no permission).

    Creates the parent folder. Used before long computations whose result goes to ``path``.
    """
    path = os.path.abspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(errno.EISDIR, "is a folder, expected a file path", path)
    parent = os.path.dirname(path)
    ancestor = parent
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise NotADirectoryError(errno.ENOTDIR, f"cannot be written, {ancestor} is a file", path)
    os.makedirs(parent, exist_ok=True)
    if not os.access(parent, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise PermissionError(errno.EACCES, "not writable", path)
    return path
