"""Atomic checkpoint files: write to a temp file, fsync, rename, fsync the directory."""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from distkd.errors import CheckpointError, first_line

TEMP_SUFFIX = ".tmp"


def save_atomic(state: dict[str, Any], path: Path) -> None:
    """Write ``state`` with ``torch.save`` so that ``path`` is always either the old or the new file.

    The file gets the mode the process umask gives new files (as every other run file), not mkstemp's 0600.
    A full disk is a one-line ``CheckpointError`` saying that the previous checkpoint is intact.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            kept = f"the previous {path.name} is intact" if path.exists() else f"no {path.name} was written"
            raise CheckpointError(f"the disk is full: could not write {path} ({kept}); free space and resume "
                                  "with --resume") from None
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def remove_stale_temp_files(folder: Path) -> list[Path]:
    """Delete the temp files a process killed while writing a checkpoint left in ``folder``; return them."""
    stale = sorted(folder.glob(f".*{TEMP_SUFFIX}")) if folder.is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def load_state(path: Path) -> dict[str, Any]:
    """Read a distkd training checkpoint (weights_only: nothing in it is executed)."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): its writing never finished; "
                              "use another checkpoint (checkpoints/best.pt or last.pt of the run)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means the same thing to the user
        raise CheckpointError(f"cannot read checkpoint {path}: {first_line(exc)}") from None
    if not isinstance(state, dict) or not {"model", "epoch"} <= set(state):
        raise CheckpointError(
            f"{path} is not a distkd training checkpoint (it lacks the 'model' and 'epoch' entries distkd writes); "
            "to evaluate plain weights, name them in a config: distkd eval CONFIG model.checkpoint=PATH"
        )
    return state
