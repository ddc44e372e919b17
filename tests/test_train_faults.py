"""The trainer's faults: incompatible resumes, the workdir lock, corrupt checkpoints, duplicated metric rows,
peft exports of uncommitted checkpoints (tiny offline config, in process)."""

import json
import logging
import os
import shutil
import socket
import subprocess

import jax
import jax.numpy as jnp
import pytest
from safetensors import safe_open

from configs import dro
from dso_jax import checkpoint, lora, train, workdir
from dso_jax.metrics_writer import read_rows


def _config(**over):
    c = dro.get_config("tiny")
    c.train.steps, c.train.ckpt_every, c.train.log_every, c.train.keep_ckpts = 4, 2, 1, 3
    c.train.peft_export = "lora"
    for k, v in over.items():
        section, name = k.split(".")
        c[section][name] = v
    return c


def _peft(path):
    """A peft export's metadata and every tensor's dtype, shape and bytes (the header's JSON key order is
    safetensors' own and varies between processes, so whole-file bytes are not comparable)."""
    with safe_open(path, "np") as f:
        return f.metadata(), {k: (str(v.dtype), v.shape, v.tobytes()) for k in f.keys() for v in [f.get_tensor(k)]}


def _bytes(path):
    with open(path, "rb") as f:
        return f.read()


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 4-step run (checkpoints 2 and 4, a metrics row per step)."""
    wd = str(tmp_path_factory.mktemp("finished"))
    train.train_and_evaluate(_config(), wd)
    return wd


def _copy(finished, tmp_path):
    dst = str(tmp_path / "wd")
    shutil.copytree(finished, dst)
    return dst


def test_resume_with_another_lora_rank_is_refused_and_config_json_kept(finished, tmp_path):
    wd = _copy(finished, tmp_path)
    before = _bytes(os.path.join(wd, "config.json"))
    with pytest.raises(ValueError, match=r"checkpoints of a run with lora.rank=4, this config has lora.rank=8"):
        train.train_and_evaluate(_config(**{"lora.rank": 8}), wd)
    assert _bytes(os.path.join(wd, "config.json")) == before
    assert not os.path.exists(os.path.join(wd, workdir.RESUMED_CONFIG_FILE))
    assert not os.path.exists(os.path.join(wd, workdir.LOCK_FILE))


def test_killed_after_logging_resumes_without_duplicated_rows(finished, tmp_path):
    """A process killed after it logged steps 3-4 but before checkpoint 4 committed: the rerun logs 3-4 once."""
    wd = _copy(finished, tmp_path)
    shutil.rmtree(os.path.join(wd, "checkpoints", "4"))
    os.remove(os.path.join(wd, "peft", "step_0000004.safetensors"))
    config_json = _bytes(os.path.join(wd, "config.json"))
    train.train_and_evaluate(_config(**{"train.log_every": 2}), wd)  # log_every may change on a resume
    assert [r["step"] for r in read_rows(wd)] == [1, 2, 4]
    assert _bytes(os.path.join(wd, "config.json")) == config_json  # the config of the run that made checkpoint 2
    with open(os.path.join(wd, workdir.RESUMED_CONFIG_FILE)) as f:
        assert json.load(f)["train"]["log_every"] == 2
    replayed = _peft(os.path.join(wd, "peft", "step_0000004.safetensors"))
    assert replayed == _peft(os.path.join(finished, "peft", "step_0000004.safetensors"))


@pytest.mark.parametrize("damage", ["truncate", "remove"])
def test_corrupt_latest_checkpoint_falls_back_to_the_newest_intact_one(finished, tmp_path, damage, caplog):
    wd = _copy(finished, tmp_path)
    state_dir = os.path.join(wd, "checkpoints", "4", "state")
    if damage == "remove":
        os.remove(os.path.join(state_dir, "_METADATA"))
    else:
        for name in os.listdir(os.path.join(state_dir, "d")):  # the array data
            path = os.path.join(state_dir, "d", name)
            with open(path, "r+b") as fh:
                fh.truncate(os.path.getsize(path) // 2)
    with caplog.at_level(logging.WARNING):
        train.train_and_evaluate(_config(), wd)
    assert any("checkpoints/4 does not restore" in r.getMessage() for r in caplog.records)
    assert os.path.isdir(os.path.join(wd, "checkpoints.corrupt", "4"))  # kept aside for inspection
    assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["2", "4"]  # step 4 trained and saved again
    assert [r["step"] for r in read_rows(wd)] == [1, 2, 3, 4]
    replayed = _peft(os.path.join(wd, "peft", "step_0000004.safetensors"))
    assert replayed == _peft(os.path.join(finished, "peft", "step_0000004.safetensors"))


def test_a_live_lock_refuses_a_second_run(finished, tmp_path):
    wd = _copy(finished, tmp_path)
    lock = workdir.WorkdirLock(wd)
    with lock:  # this process holds it, as a second run on the same host would see
        with pytest.raises(FileExistsError, match=rf"{wd} is in use by pid {os.getpid()} on this host"):
            train.train_and_evaluate(_config(), wd)
        assert os.path.exists(lock.path)
    assert not os.path.exists(lock.path)


def test_a_lock_of_another_host_is_never_taken_over(tmp_path):
    with open(tmp_path / workdir.LOCK_FILE, "w") as f:
        json.dump({"host": "elsewhere", "pid": 1, "start": None}, f)
    with pytest.raises(FileExistsError, match="in use by pid 1 on host elsewhere"):
        workdir.WorkdirLock(str(tmp_path)).acquire()


def test_a_stale_lock_is_taken_over_with_a_warning(tmp_path, caplog):
    dead = subprocess.Popen(["true"])
    dead.wait()
    me = workdir.WorkdirLock(str(tmp_path))
    cases = [
        {"host": socket.gethostname(), "pid": dead.pid, "start": None},  # the process is gone
        {"host": socket.gethostname(), "pid": os.getpid(), "start": -1},  # the pid now runs another process
    ]
    for owner in cases:
        with open(me.path, "w") as f:
            json.dump(owner, f)
        with caplog.at_level(logging.WARNING):
            me.acquire()
        assert "took over the stale lock" in caplog.text
        with open(me.path) as f:
            assert json.load(f)["pid"] == os.getpid()
        me.release()
        caplog.clear()


def test_workdir_that_is_a_file_or_unwritable_is_refused(tmp_path, monkeypatch):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file"):
        workdir.prepare(str(f))
    with pytest.raises(NotADirectoryError, match="is a file"):
        workdir.prepare(str(f / "run"))
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # a read-only parent (tests run as root)
    with pytest.raises(PermissionError, match="is not writable"):
        workdir.prepare(str(tmp_path / "new"))


def test_peft_export_waits_for_its_checkpoint_to_commit(tmp_path, monkeypatch):
    base = {"blocks_0": {"self_attn": {"to_qkv": {"kernel": jnp.ones((8, 24))}}}}
    overlay = lora.init_overlay(jax.random.PRNGKey(0), base, rank=2, alpha=4.0)
    ckpt = checkpoint.Checkpointer(str(tmp_path), keep=3, peft_export="lora")
    ckpt.save(1, {"overlay": overlay}, {"step": 1})
    path = ckpt.export_peft(1, base, overlay, module=None)
    assert not os.path.exists(path)  # the save may still be in flight
    ckpt.save(2, {"overlay": overlay}, {"step": 2})  # waits for save 1, then writes its export
    assert os.path.exists(path)
    ckpt.export_peft(2, base, overlay, module=None)
    all_steps = ckpt.manager.all_steps
    monkeypatch.setattr(ckpt.manager, "all_steps", lambda: [s for s in all_steps() if s != 2])
    ckpt.close()  # step 2 did not commit (as if its save failed): no export for it
    assert not os.path.exists(ckpt.peft_path(2)) and os.path.exists(path)
