"""End to end on the CPU: the tiny DRO config trains, and a SIGKILLed run resumes exactly."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 30
ARGS = [f"--config={REPO}/configs/dro.py:tiny", f"--config.train.steps={STEPS}", "--config.train.ckpt_every=5"]


def _command(workdir):
    return [sys.executable, os.path.join(REPO, "scripts", "train.py"), *ARGS, f"--workdir={workdir}"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("xla_cache"))


def _env(cache_dir):
    # The three runs share one persistent compilation cache: the step compiles once. PYTHONPATH: this
    # checkout's dso_jax, whatever is installed.
    return dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]),
        JAX_PLATFORMS="cpu",
        PYTHONUNBUFFERED="1",
        JAX_COMPILATION_CACHE_DIR=cache_dir,
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )


def _run(workdir, cache_dir):
    out = subprocess.run(_command(workdir), env=_env(cache_dir), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def _final_overlay(workdir):
    return load_file(os.path.join(workdir, "peft", f"step_{STEPS:07d}.safetensors"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, cache_dir):
    workdir = str(tmp_path_factory.mktemp("full"))
    _run(workdir, cache_dir)
    return workdir


def test_tiny_dro_trains_and_the_loss_goes_down(uninterrupted):
    with open(os.path.join(uninterrupted, "metrics.jsonl")) as f:
        logs = [json.loads(line) for line in f]
    assert [m["step"] for m in logs] == list(range(5, STEPS + 1, 5))
    assert logs[-1]["loss"] < logs[0]["loss"] - 0.02  # DRO: L_win - L_lose falls
    assert logs[-1]["loss_win"] - logs[-1]["loss_lose"] < logs[0]["loss_win"] - logs[0]["loss_lose"]
    assert os.path.exists(os.path.join(uninterrupted, "config.json"))
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(uninterrupted, "tb")))
    assert sorted(os.listdir(os.path.join(uninterrupted, "peft"))) == [f"step_{s:07d}.safetensors" for s in (25, 30)]


def test_sigkill_then_rerun_ends_bit_identical(uninterrupted, cache_dir, tmp_path):
    workdir = str(tmp_path / "killed")
    proc = subprocess.Popen(
        _command(workdir), env=_env(cache_dir), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    first_ckpt = os.path.join(workdir, "checkpoints", "5")
    deadline = time.time() + 240
    while not os.path.isdir(first_ckpt) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    steps = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
    assert steps and steps[-1] < STEPS, f"the run was not killed mid-way (checkpoints {steps})"

    out = _run(workdir, cache_dir)
    assert f"resumed from {workdir}/checkpoints at step {steps[-1]}" in out.stderr
    want, got = _final_overlay(uninterrupted), _final_overlay(workdir)
    assert sorted(want) == sorted(got)
    for k in want:
        assert np.array_equal(want[k].view(np.uint8), got[k].view(np.uint8)), k
