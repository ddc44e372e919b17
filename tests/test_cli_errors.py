"""The trainers' command lines end every expected error in one line naming the flag, file or key, exit 2,
no traceback (scripts/train.py, pretrain_toy.py, eval_toy.py, make_toy_dataset.py, in process)."""

import errno
import importlib.util
import os

import numpy as np
import pytest

from dso_jax import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _script(name):
    spec = importlib.util.spec_from_file_location(f"_script_{name}", os.path.join(REPO, "scripts", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch):
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    monkeypatch.setattr("sys.argv", ["prog"])


def _one_line(capsys, rc, needle):
    err = capsys.readouterr().err
    assert rc == cli.EXIT_USER_ERROR, err
    assert "Traceback" not in err
    first = [line for line in err.splitlines() if ": error: " in line]
    assert len(first) == 1 and needle in first[0], err
    return first[0]


def _full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device", "/full/disk/file")


DRO = f"--config={REPO}/configs/dro.py"


@pytest.mark.parametrize(
    "args, needle",
    [
        ([f"{DRO}:tiny", "--config.loss=foo"], "config.loss must be one of ['dpo', 'dro', 'sft'], got 'foo'"),
        ([f"{DRO}:tiny", "--config.train.steps=abc"], "flag --config.train.steps=abc: invalid literal for int()"),
        ([f"{DRO}:tiny", "--config.train.stepz=3"], "unknown config key train.stepz"),
        ([f"{DRO}:tiny", "--config.mode=both"], "config.mode must be one of ['offline', 'online'], got 'both'"),
        ([f"{DRO}:huge"], "unknown config variant 'huge' (known: 'tiny', 'toy')"),
        (["--config=configs/nope.py"], "--config configs/nope.py: no such file"),
        ([DRO, "--config.data.path=/nonexistent/pairs"], "data.path '/nonexistent/pairs': no dso_pairs TFDS dataset"),
        ([DRO], "data.path is empty"),
        ([f"{DRO}:tiny", "--config.model.path=/nonexistent/model"], "model.path /nonexistent/model: no such file"),
        ([f"{DRO}:toy", "--config.eval.batch=0"], "eval.batch must be >= 1, got 0"),
        ([f"{DRO}:tiny", "--unknown_flag=1"], "Unknown command line flag 'unknown_flag'"),
    ],
)
def test_train_bad_config(args, needle, tmp_path, capsys):
    rc = _script("train").main(["train.py", *args, f"--workdir={tmp_path / 'run'}"])
    _one_line(capsys, rc, needle)
    assert not os.path.exists(tmp_path / "run")  # refused before anything was written


def test_train_workdir_problems(tmp_path, capsys, monkeypatch):
    train = _script("train")
    f = tmp_path / "file"
    f.write_text("x")
    _one_line(capsys, train.main(["train.py", f"{DRO}:tiny", f"--workdir={f}"]), f"--workdir {f} is a file")
    _one_line(capsys, train.main(["train.py", f"{DRO}:tiny"]), "Flag --workdir must have a value")
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # read-only (the tests run as root)
    _one_line(capsys, train.main(["train.py", f"{DRO}:tiny", f"--workdir={tmp_path / 'ro'}"]), "is not writable")


def test_train_full_disk(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("dso_jax.workdir.os.replace", _full_disk)  # writing config.json
    rc = _script("train").main(["train.py", f"{DRO}:tiny", f"--workdir={tmp_path / 'run'}"])
    _one_line(capsys, rc, "no space left on the device writing /full/disk/file")
    assert not os.path.exists(tmp_path / "run" / "run.lock")  # the lock is released on the way out


TOY = f"--config={REPO}/configs/pretrain_toy.py"


@pytest.mark.parametrize(
    "args, needle",
    [
        ([f"{TOY}:huge"], "unknown config variant 'huge' (known: 'micro')"),
        ([f"{TOY}:micro", "--config.eval.physics=warp"], "eval.physics must be 'mjx' or 'static', got 'warp'"),
        ([f"{TOY}:micro", "--config.optim.schedule=linear"], "optim.schedule must be one of"),
        (["--config=nope.py"], "--config nope.py: no such file"),
    ],
)
def test_pretrain_bad_config(args, needle, tmp_path, capsys):
    rc = _script("pretrain_toy").main(["pretrain_toy.py", *args, f"--workdir={tmp_path}/w", f"--out={tmp_path}/o"])
    _one_line(capsys, rc, needle)
    assert not os.path.exists(tmp_path / "w") and not os.path.exists(tmp_path / "o")


def test_pretrain_destinations(tmp_path, capsys, monkeypatch):
    pretrain = _script("pretrain_toy")
    f = tmp_path / "file"
    f.write_text("x")
    rc = pretrain.main(["pretrain_toy.py", f"{TOY}:micro", f"--workdir={tmp_path}/w", f"--out={f}"])
    _one_line(capsys, rc, f"{f} is a file")
    monkeypatch.setattr("dso_jax.convert.trellis.write_json", _full_disk)  # the workdir's config.json
    rc = pretrain.main(["pretrain_toy.py", f"{TOY}:micro", f"--workdir={tmp_path}/w", f"--out={tmp_path}/o"])
    _one_line(capsys, rc, "no space left on the device")
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    rc = pretrain.main(["pretrain_toy.py", f"{TOY}:micro", f"--workdir={tmp_path}/w2", f"--out={tmp_path}/o"])
    _one_line(capsys, rc, "is not writable")


def test_eval_toy_missing_weights_and_bad_workdir(tmp_path, capsys):
    ev = _script("eval_toy")
    rc = ev.main(["eval_toy.py", f"{TOY}:micro", "--weights=/nonexistent/toy", f"--workdir={tmp_path}/w"])
    _one_line(capsys, rc, "--weights /nonexistent/toy: no such directory")
    f = tmp_path / "file"
    f.write_text("x")
    rc = ev.main(["eval_toy.py", f"{TOY}:micro", f"--weights={REPO}/ported_weights/toy", f"--workdir={f}"])
    _one_line(capsys, rc, "is a file")
    rc = ev.main(["eval_toy.py", f"{TOY}:micro", "--config.eval.num_candidates=0", f"--workdir={tmp_path}/w"])
    _one_line(capsys, rc, "eval.num_candidates must be >= 1, got 0")


def test_make_toy_dataset_destinations(tmp_path, capsys, monkeypatch):
    make = _script("make_toy_dataset")
    _one_line(capsys, make.main(["--out", str(tmp_path), "--n", "2"]), "is a directory")
    f = tmp_path / "file"
    f.write_text("x")
    _one_line(capsys, make.main(["--out", str(f / "d.npz"), "--n", "2"]), "is a file")
    monkeypatch.setattr(np, "savez_compressed", _full_disk)
    _one_line(capsys, make.main(["--out", str(tmp_path / "d.npz"), "--n", "2"]), "no space left on the device")
    assert os.listdir(tmp_path) == ["file"]  # no partial dataset left behind
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    _one_line(capsys, make.main(["--out", str(tmp_path / "ro" / "d.npz"), "--n", "2"]), "is not writable")
    with pytest.raises(SystemExit) as e:
        make.main(["--out", str(tmp_path / "d.npz"), "--n", "0"])
    assert e.value.code == 2 and "argument --n: must be >= 1, got 0" in capsys.readouterr().err
