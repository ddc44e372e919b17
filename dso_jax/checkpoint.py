"""Checkpoints of a training run: orbax under ``<workdir>/checkpoints``, peft exports beside them.

Each checkpoint step holds ``state`` (the train state pytree: step, LoRA overlay, optimizer state,
RNG key data) and ``meta`` (JSON: step, data position, loss name). Orbax writes into a temporary
directory and renames it when complete, so a run killed mid-save leaves the previous checkpoint
intact and :meth:`Checkpointer.latest_step` never returns a partial one. The frozen base weights
are not saved: they come from ``model.path`` (or the seed) again on resume.

Beside each checkpoint, ``<workdir>/peft/step_XXXXXXX.safetensors`` is the overlay in peft's
format (``dso_jax.convert.peft.save_peft``): a full DSO-style state dict or the adapter only.
"""

from __future__ import annotations

import glob
import logging
import os
import re
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from dso_jax import lora
from dso_jax.convert.peft import save_peft


def _to_host(tree):
    if jax.process_count() > 1:
        return multihost_utils.process_allgather(tree, tiled=True)
    return jax.device_get(tree)


class Checkpointer:
    """Save / restore the train state; ``peft_export`` in {'full', 'lora', 'none'}."""

    def __init__(self, workdir: str, *, keep: int, peft_export: str = "full"):
        if peft_export not in ("full", "lora", "none"):
            raise ValueError(f"train.peft_export must be 'full', 'lora' or 'none', got {peft_export!r}")
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        self.peft_dir = os.path.join(os.path.abspath(workdir), "peft")
        self.peft_export = peft_export
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=True, cleanup_tmp_directories=True
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))
        self._host_base = None

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def restore(self, abstract_state, step: Optional[int] = None) -> tuple[Any, dict]:
        """(state, meta) of ``step`` (default: latest); arrays land with ``abstract_state``'s shardings."""
        step = self.latest_step() if step is None else step
        out = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
        )
        return out["state"], dict(out["meta"])

    def save(self, step: int, state, meta: dict) -> None:
        """Start saving ``state`` (asynchronously after the device-to-host copy)."""
        self.manager.save(
            step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True
        )

    def export_peft(self, step: int, base_params, overlay: lora.Overlay, module) -> Optional[str]:
        """Write the overlay as peft safetensors beside the checkpoint; prune exports of deleted steps.

        ``module`` (the Flax model) supplies the TRELLIS json args and buffers of a full state dict.
        """
        if self.peft_export == "none":
            return None
        overlay = _to_host(overlay)
        full = self.peft_export == "full"
        if full and self._host_base is None:
            self._host_base = _to_host(base_params)  # the base never changes: gather once
        path = os.path.join(self.peft_dir, f"step_{step:07d}.safetensors")
        if jax.process_index() == 0:
            # save_peft writes a temporary file and renames it: a reader never sees a partial file.
            save_peft(
                path, self._host_base if full else None, overlay, full_state_dict=full, config=module if full else None
            )
            self._prune_exports(keep_also=step)
        return path

    def _prune_exports(self, keep_also: int) -> None:
        kept = set(self.manager.all_steps()) | {keep_also}
        for f in glob.glob(os.path.join(self.peft_dir, "step_*.safetensors")):
            m = re.fullmatch(r"step_(\d+)\.safetensors", os.path.basename(f))
            if m and int(m.group(1)) not in kept:
                os.remove(f)

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
        logging.info("checkpoints in %s", self.directory)
