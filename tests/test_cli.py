"""dso_jax.cli.run: expected errors become one line and exit 2; --debug / DSO_JAX_DEBUG re-raise."""

import errno
import sys

import pytest

from dso_jax import cli
from dso_jax.convert.verify import ConversionError


@pytest.mark.parametrize(
    "exc, needle",
    [
        (FileNotFoundError("data/x.npz: no such file"), "data/x.npz: no such file"),
        (
            ConversionError("a.safetensors: missing key 'w'\na.safetensors: bad shape"),
            "missing key 'w' | a.safetensors",
        ),
        (
            OSError(errno.ENOSPC, "No space left on device", "/full/file"),
            "no space left on the device writing /full/file",
        ),
        (KeyError("lora.rank"), "missing key 'lora.rank'"),
    ],
)
def test_expected_errors_are_one_line(exc, needle, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["prog"])
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)

    def main():
        raise exc

    assert cli.run(main, prog="prog") == cli.EXIT_USER_ERROR
    err = capsys.readouterr().err
    first = err.splitlines()[0]
    assert first.startswith("prog: error: ") and needle in first
    assert "Traceback" not in err


def test_debug_reraises_and_programming_errors_keep_traceback(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["prog", "--debug"])
    with pytest.raises(ValueError):
        cli.run(lambda: (_ for _ in ()).throw(ValueError("bad")))
    monkeypatch.setattr(sys, "argv", ["prog"])
    monkeypatch.setenv(cli.DEBUG_ENV, "1")
    with pytest.raises(ValueError):
        cli.run(lambda: (_ for _ in ()).throw(ValueError("bad")))
    monkeypatch.delenv(cli.DEBUG_ENV)
    with pytest.raises(ZeroDivisionError):  # not an expected error: the traceback stays
        cli.run(lambda: 1 / 0)
    assert cli.run(lambda: None) == 0 and cli.run(lambda: 3) == 3
    assert cli.strip_debug(["a", "--debug", "b"]) == ["a", "b"]
