"""A trainer's workdir before anything is written to it: the path check, the resume check and the lock.

``check_resume(config, workdir)`` compares the config with the ``config.json`` of the run that made the
workdir's checkpoints, on the keys that change what a checkpoint means (:data:`RESUME_KEYS`); a difference is
refused in one line naming the key. Other keys (``train.steps``, ``train.log_every``, ``eval.*``, ...) may
change on a resume. The ``config.json`` of a run with checkpoints is never overwritten: a resume with a
different config writes it beside as ``config.resumed.json``.

``WorkdirLock`` refuses a second run on the same workdir: ``<workdir>/run.lock`` is created atomically
(``O_CREAT | O_EXCL``) and holds the host, the pid and the process's start time. A lock is stale when its host
is this host and its pid is not running, or runs a process started at another time (a reused pid; the start
time is read from ``/proc``): it is taken over with a warning. A lock of another host cannot be checked and is
never taken over (the message names the file to remove). In a multi-host run only process 0 takes it.
"""

from __future__ import annotations

import json
import logging
import os
import socket

CONFIG_FILE = "config.json"
RESUMED_CONFIG_FILE = "config.resumed.json"
LOCK_FILE = "run.lock"

# What a checkpoint means: the state's structure and values (model, LoRA), the objective, the data stream of
# step s (seed, batch shape, candidates per condition) and, online, the decoder whose verdicts label the samples.
# model.path is not here: a moved folder with the same architecture (model.args) may resume.
RESUME_KEYS = (
    "mode",
    "loss",
    "seed",
    "model.name",
    "model.args",
    "lora.rank",
    "lora.alpha",
    "lora.targets",
    "optim.grad_clip",  # > 0 adds a clipping state to the optimizer state
    "optim.schedule",
    "train.batch_size",
    "train.grad_accum",
    "data.kind",
    "online.num_candidates",
    "online.updates_per_sample",
    "decoder.kind",
    "decoder.args",
)


def prepare(path: str, flag: str = "--workdir") -> str:
    """The absolute output folder ``path``, or a one-line error naming ``flag`` when it is a file or the folder
    it would be created in cannot be written (checked before a run spends its time)."""
    path = os.path.abspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise NotADirectoryError(f"{flag} {path} is a file, not a directory")
    parent = path
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise NotADirectoryError(f"{flag} {path}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"{flag} {path}: {parent} is not writable")
    return path


def has_checkpoints(workdir: str) -> bool:
    ckpts = os.path.join(workdir, "checkpoints")
    return os.path.isdir(ckpts) and any(d.isdigit() for d in os.listdir(ckpts))


def _get(tree, dotted: str):
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def _normalise(value):
    if isinstance(value, dict):
        return {k: _normalise(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_normalise(v) for v in value]
    return value


def config_json(config) -> str:
    """The text written as ``config.json``."""
    return config.to_json_best_effort(indent=2, sort_keys=True)


def check_resume(config, workdir: str) -> None:
    """Refuse (ValueError naming the key) a config that cannot resume the workdir's checkpoints."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not has_checkpoints(workdir) or not os.path.exists(path):
        return
    try:
        with open(path) as f:
            old = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: unreadable ({e}); it describes the checkpoints in {workdir}") from None
    new = json.loads(config_json(config))
    for key in RESUME_KEYS:
        a, b = _normalise(_get(old, key)), _normalise(_get(new, key))
        if a != b:
            raise ValueError(
                f"{workdir} holds checkpoints of a run with {key}={json.dumps(a)}, this config has "
                f"{key}={json.dumps(b)}; resume with the same {key} or use another --workdir"
            )


def write_config(config, workdir: str) -> None:
    """``config.json`` for a new run; a resume with a different config writes ``config.resumed.json``."""
    path = os.path.join(workdir, CONFIG_FILE)
    text = config_json(config)
    if os.path.exists(path) and has_checkpoints(workdir):
        with open(path) as f:
            if f.read() == text:
                return
        logging.warning(
            "config differs from %s (kept: it made the checkpoints); this one is %s", path, RESUMED_CONFIG_FILE
        )
        path = os.path.join(workdir, RESUMED_CONFIG_FILE)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _start_time(pid: int):
    """The process's start time in clock ticks since boot (``/proc/PID/stat`` field 22), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _alive(pid: int, start) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, another user's
    return start is None or _start_time(pid) in (None, start)


class WorkdirLock:
    """``with WorkdirLock(workdir):`` holds ``<workdir>/run.lock`` (see the module docstring)."""

    def __init__(self, workdir: str, enabled: bool = True):
        self.path = os.path.join(workdir, LOCK_FILE)
        self.enabled = enabled
        self.held = False

    def acquire(self) -> None:
        if not self.enabled:
            return
        me = {"host": socket.gethostname(), "pid": os.getpid(), "start": _start_time(os.getpid())}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_stale(me["host"])
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return
        raise RuntimeError(f"{self.path}: could not take the lock")

    def _take_over_if_stale(self, host: str) -> None:
        try:
            with open(self.path) as f:
                text = f.read()
            owner = json.loads(text)
            pid, owner_host = int(owner["pid"]), str(owner["host"])
        except FileNotFoundError:
            return  # released meanwhile: try again
        except (OSError, ValueError, KeyError, TypeError):
            raise FileExistsError(f"{self.path}: unreadable lock file; remove it if no run uses this workdir") from None
        where = os.path.dirname(self.path)
        if owner_host != host:
            raise FileExistsError(
                f"{where} is in use by pid {pid} on host {owner_host} ({self.path}); remove it if that run is gone"
            )
        if _alive(pid, owner.get("start")):
            raise FileExistsError(f"{where} is in use by pid {pid} on this host ({self.path}); wait for it")
        stale = f"{self.path}.stale.{os.getpid()}"
        try:
            os.rename(self.path, stale)  # atomic: of two runs taking over, one renames the stale lock
        except FileNotFoundError:
            return
        with open(stale) as f:
            taken = f.read()
        if taken != text:  # another run took over first and this was its fresh lock: give it back
            try:
                os.link(stale, self.path)
            finally:
                os.remove(stale)
            raise FileExistsError(f"{where} is in use by another run ({self.path})")
        os.remove(stale)
        logging.warning("took over the stale lock %s of pid %d, which is not running", self.path, pid)

    def release(self) -> None:
        if self.held:
            self.held = False
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()
