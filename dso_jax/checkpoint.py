"""Checkpoints of a training run: orbax under ``<workdir>/checkpoints``, peft exports beside them.

Each checkpoint step holds ``state`` (the train state pytree: step, LoRA overlay, optimizer state,
RNG key data) and ``meta`` (JSON: step, data position, loss name, wall time so far). Orbax writes into a
temporary directory and renames it when complete, so a run killed mid-save leaves the previous checkpoint
intact and orbax never lists a partial one. The frozen base weights
are not saved: they come from ``model.path`` (or the seed) again on resume.

A step folder that does not restore (a truncated or removed file) is moved to
``<workdir>/checkpoints.corrupt/`` with a warning and the newest intact step is restored instead.

Beside each checkpoint, ``<workdir>/peft/step_XXXXXXX.safetensors`` is the overlay in peft's
format (``dso_jax.convert.peft.save_peft``): a full DSO-style state dict or the adapter only. Orbax saves
asynchronously, so an export is written only once its step's save is final (at the next save or at
:meth:`Checkpointer.close`): a peft file always belongs to a committed checkpoint.
"""

from __future__ import annotations

import glob
import logging
import os
import re
import shutil
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from dso_jax import lora
from dso_jax.convert.peft import save_peft

PEFT_EXPORTS = ("full", "lora", "none")


def _to_host(tree):
    if jax.process_count() > 1:
        return multihost_utils.process_allgather(tree, tiled=True)
    return jax.device_get(tree)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 300 else text[:297] + "..."


class Checkpointer:
    """Save / restore the train state; ``peft_export`` in {'full', 'lora', 'none'}."""

    def __init__(self, workdir: str, *, keep: int, peft_export: str = "full"):
        if peft_export not in PEFT_EXPORTS:
            raise ValueError(f"train.peft_export must be 'full', 'lora' or 'none', got {peft_export!r}")
        workdir = os.path.abspath(workdir)
        self.directory = os.path.join(workdir, "checkpoints")
        self.corrupt_dir = os.path.join(workdir, "checkpoints.corrupt")
        self.peft_dir = os.path.join(workdir, "peft")
        self.peft_export = peft_export
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=True, cleanup_tmp_directories=True
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))
        self._host_base = None
        self._pending: list = []  # (step, host overlay, module): exports waiting for their save to commit

    def restore(self, abstract_state, step: int) -> tuple[Any, dict]:
        """(state, meta) of ``step``; arrays land with ``abstract_state``'s shardings."""
        out = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
        )
        return out["state"], dict(out["meta"])

    def restore_latest(self, abstract_state) -> Optional[tuple[Any, dict]]:
        """(state, meta) of the newest step that restores, or None when there is no checkpoint.

        A step that fails to restore is moved to ``checkpoints.corrupt/`` (kept for inspection) with a warning.
        """
        self.manager.reload()
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                return self.restore(abstract_state, step)
            except Exception as e:  # noqa: BLE001  (orbax and tensorstore raise many kinds for a damaged folder)
                self._set_aside(step, e)
        return None

    def _set_aside(self, step: int, error: BaseException) -> None:
        src = os.path.join(self.directory, str(step))
        dst = os.path.join(self.corrupt_dir, str(step))
        if jax.process_index() == 0:
            os.makedirs(self.corrupt_dir, exist_ok=True)
            if os.path.exists(dst):
                shutil.rmtree(dst)
            shutil.move(src, dst)
            logging.warning("checkpoint %s does not restore (%s); moved to %s", src, _one_line(error), dst)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"checkpoint_set_aside_{step}")
        self.manager.reload()

    def save(self, step: int, state, meta: dict) -> None:
        """Start saving ``state`` (asynchronously after the device-to-host copy); the previous save, and
        with it its peft export, is finished first."""
        self._finish_pending()
        self.manager.save(
            step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True
        )

    def export_peft(self, step: int, base_params, overlay: lora.Overlay, module) -> Optional[str]:
        """Export the overlay of checkpoint ``step`` as peft safetensors once that checkpoint is committed.

        ``module`` (the Flax model) supplies the TRELLIS json args and buffers of a full state dict. The
        overlay is copied to the host now (the device buffers are donated to the next step). Returns the path.
        """
        if self.peft_export == "none":
            return None
        if self.peft_export == "full" and self._host_base is None:
            self._host_base = _to_host(base_params)  # the base never changes: gather once
        self._pending.append((step, _to_host(overlay), module))
        return self.peft_path(step)

    def peft_path(self, step: int) -> str:
        return os.path.join(self.peft_dir, f"step_{step:07d}.safetensors")

    def _finish_pending(self) -> None:
        if not self._pending:
            return
        self.manager.wait_until_finished()
        self.manager.reload()  # the steps on disk, finalised
        committed = set(self.manager.all_steps())
        pending, self._pending = self._pending, []
        for step, overlay, module in pending:
            if step in committed:
                self._write_peft(step, overlay, module)

    def _write_peft(self, step: int, overlay, module) -> None:
        full = self.peft_export == "full"
        path = self.peft_path(step)
        if jax.process_index() == 0:
            # save_peft writes a temporary file and renames it: a reader never sees a partial file.
            save_peft(
                path, self._host_base if full else None, overlay, full_state_dict=full, config=module if full else None
            )
            self._prune_exports()

    def _prune_exports(self) -> None:
        kept = set(self.manager.all_steps())
        for f in glob.glob(os.path.join(self.peft_dir, "step_*.safetensors")):
            m = re.fullmatch(r"step_(\d+)\.safetensors", os.path.basename(f))
            if m and int(m.group(1)) not in kept:
                os.remove(f)

    def close(self) -> None:
        """Wait for the last save, write the exports it commits, close the manager."""
        self.manager.wait_until_finished()
        self._finish_pending()
        self.manager.close()
        logging.info("checkpoints in %s", self.directory)
