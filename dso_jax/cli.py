"""What every command-line entry point shares: expected errors as one line, a non-zero exit, no traceback.

``run(main)`` calls ``main()`` and turns the errors a user can cause (a bad config value, a missing or
unreadable file, a malformed checkpoint, a full disk) into ``error: <one line naming the file/key/shape>``
on stderr with exit status 2. A traceback is printed only when asked for: ``--debug`` on the command
line or ``DSO_JAX_DEBUG=1`` in the environment. Programming errors (anything else) keep their traceback.
"""

from __future__ import annotations

import errno
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
