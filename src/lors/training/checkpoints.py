"""Resumable training state: complete checkpoints or none, and the best-so-far weights.

A checkpoint is accelerate's state (model, optimizer, scheduler and every process's RNG) plus
``trainer_state.json``, written into ``step-N.tmp`` (one name every process agrees on) and
published as ``step-N`` (``fsutil.publish``) by the main process once every process has
written its part; older checkpoints are removed after that. A full disk or a kill while
saving therefore leaves the previous checkpoint as the newest valid one. The folder must be
on a file system every process sees (one machine, or a shared file system across machines).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import LorsError
from ..fsutil import atomic_file, atomic_path, publish

STATE_FILE = "trainer_state.json"


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest complete ``step-N`` checkpoint under ``folder``, or None."""
    found = [p for p in Path(folder).glob("step-*") if p.is_dir() and not p.name.endswith(".tmp")
             and (p / STATE_FILE).is_file()]
    return max(found, key=lambda p: int(p.name.split("-")[1]), default=None)


def save_checkpoint(accelerator, folder: Path, step: int, state: dict) -> Path:
    """Save a checkpoint for ``step`` (all processes call this); returns its folder."""
    final = Path(folder) / f"step-{step:07d}"
    tmp = final.with_name(final.name + ".tmp")
    try:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        accelerator.wait_for_everyone()
        with _quiet_shared_tensor_notice():
            accelerator.save_state(str(tmp))
        # every process writes its own RNG state into ``tmp``: all must be done before the
        # main process publishes (renames) it
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
            publish(tmp, final, force=True)
            for old in Path(folder).glob("step-*"):
                if old != final:
                    shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_checkpoint(folder)
        kept = f"the last valid checkpoint is {previous}" if previous else "no checkpoint was kept"
        full = " (disk full)" if exc.errno == errno.ENOSPC else ""
        raise LorsError(f"could not save the step-{step} checkpoint in {folder}{full}: {exc}; "
                        f"{kept}. Free space and re-run the same command to resume") from exc
    return final


@contextlib.contextmanager
def _quiet_shared_tensor_notice():
    """accelerate warns on every save that Whisper's tied proj_out is stored once; it is
    restored from embed_tokens on load, so the notice is noise here."""
    logger = logging.getLogger("accelerate.utils.other")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def load_checkpoint(accelerator, checkpoint: Path) -> dict:
    """Restore model, optimizer, scheduler and RNG from ``checkpoint``; return its state."""
    accelerator.load_state(str(checkpoint))
    return json.loads((checkpoint / STATE_FILE).read_text())


def save_best(folder: Path, weights: dict[str, torch.Tensor], info: dict) -> None:
    """Write the best-so-far trainable weights and their metric, each atomically."""
    with atomic_path(folder / "best.safetensors") as tmp:
        save_file(weights, str(tmp))
    with atomic_file(folder / "best.json", "w", encoding="utf-8") as handle:
        handle.write(json.dumps(info, indent=2))


def load_best(folder: Path) -> dict[str, torch.Tensor] | None:
    path = Path(folder) / "best.safetensors"
    return load_file(str(path)) if path.is_file() else None
