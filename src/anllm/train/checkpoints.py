"""Atomic checkpoints and ``trainer.resume=auto``.

The HF Trainer writes ``checkpoint-N/`` file by file (weights, optimizer, scheduler, RNG, trainer
state), so a crash or a SLURM preemption in the middle leaves a directory that *looks* like a
checkpoint. Here a checkpoint counts only once every rank has finished writing it and rank 0 has
then written a marker file (atomically: temp file + ``os.replace``). Resume picks the newest marked
checkpoint and moves unmarked ones aside; rotation (``save_total_limit``) deletes old checkpoints
only after the new one is marked, so there is always at least one complete checkpoint to go back to.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from transformers import TrainerCallback

from ..utils import FileLock
from .distributed import barrier

logger = logging.getLogger("anllm.train")

MARKER = "anllm_checkpoint_complete.json"
PREFIX = "checkpoint-"
QUARANTINE = "incomplete_checkpoints"
_STEP = re.compile(rf"^{PREFIX}(\d+)$")


LOCK_FILE = ".anllm_train.lock"


class OutputDirLock:
    """Exclusive lock on an output_dir for one training run (held by global rank 0).

    Two runs writing the same checkpoints (a job submitted twice, a requeued job whose previous
    instance still runs) would corrupt each other, and the second one's resume would mistake the
    first one's in-progress checkpoint for an interrupted one. ``flock`` is released by the kernel
    when the process dies, so a crash never leaves a stale lock; where the filesystem has no flock
    (Lustre without ``-o flock``) a lock file with a heartbeat is used (:class:`anllm.utils.FileLock`):
    a killed run's lock is taken over once it has not been refreshed for ``ANLLM_LOCK_STALE_S``
    seconds (default 120).
    """

    def __init__(self, output_dir: str | Path):
        self.path = Path(output_dir) / LOCK_FILE
        self._lock: FileLock | None = None

    def acquire(self) -> "OutputDirLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(self.path)
        if not lock.acquire(blocking=False):
            raise RuntimeError(
                f"Another training run ({lock.holder()}) is writing to {self.path.parent}. Wait for it to finish, stop "
                "it, or choose another output_dir=..."
            )
        self._lock = lock
        return self

    def release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None


@contextmanager
def numpy1_rng_states() -> Iterator[None]:
    """Let a resume read checkpoints written under numpy 1 (before this project moved to numpy 2).

    Their ``rng_state.pth`` pickles numpy's RNG state as ``numpy.core.multiarray._reconstruct``;
    numpy 2 names it ``numpy._core...``, and torch's weights-only loader matches globals by name, so
    the Trainer's allowlist refuses the old name and the resume dies. Allow the old name for the same
    function - nothing else is added to what the weights-only loader accepts.
    """
    with torch.serialization.safe_globals([(np._core.multiarray._reconstruct, "numpy.core.multiarray._reconstruct")]):
        yield


def checkpoint_dirs(output_dir: str | Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every ``checkpoint-N`` directory, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found)


def is_complete(path: str | Path) -> bool:
    return (Path(path) / MARKER).is_file()


def latest_complete_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest checkpoint whose marker exists (None when there is none)."""
    complete = [p for _, p in checkpoint_dirs(output_dir) if is_complete(p)]
    return complete[-1] if complete else None


def quarantine_incomplete(output_dir: str | Path) -> list[Path]:
    """Move unmarked ``checkpoint-N`` dirs to ``incomplete_checkpoints/`` (the Trainer never looks there).

    They are kept rather than deleted so nothing is lost if a checkpoint came from another tool; delete
    the folder when you do not need it.
    """
    moved = []
    for _, path in checkpoint_dirs(output_dir):
        if is_complete(path):
            continue
        dest_root = Path(output_dir) / QUARANTINE
        dest_root.mkdir(exist_ok=True)
        dest = dest_root / f"{path.name}.{time.strftime('%Y%m%d-%H%M%S')}.{os.getpid()}"
        path.rename(dest)
        moved.append(dest)
        logger.warning("Checkpoint %s was not complete (interrupted save); moved to %s.", path, dest)
    return moved


def mark_complete(path: str | Path, info: dict[str, Any]) -> None:
    """Write the marker last and atomically, so it exists only for a fully written checkpoint."""
    path = Path(path)
    tmp = path / f".{MARKER}.tmp"
    with open(tmp, "w") as fh:
        json.dump(info, fh, indent=2)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path / MARKER)
    _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def rotate(output_dir: str | Path, keep: int | None) -> list[Path]:
    """Delete the oldest *complete* checkpoints beyond ``keep`` (incomplete ones are not counted)."""
    if not keep:
        return []
    complete = [p for _, p in checkpoint_dirs(output_dir) if is_complete(p)]
    doomed = complete[: max(0, len(complete) - keep)]
    for p in doomed:
        # Unmark first: if deletion is interrupted, the leftover is ignored by resume.
        (p / MARKER).unlink(missing_ok=True)
        shutil.rmtree(p, ignore_errors=True)
        logger.info("Deleted old checkpoint %s (save_total_limit=%d).", p, keep)
    return doomed


class AtomicCheckpointCallback(TrainerCallback):
    """Marks each checkpoint complete after all ranks wrote it, then rotates old ones (rank 0)."""

    def __init__(self, save_total_limit: int | None):
        self.save_total_limit = save_total_limit

    def on_step_end(self, args, state, control, **kwargs):
        self._unmark_target(args, state, control)
        return control

    def on_epoch_end(self, args, state, control, **kwargs):
        self._unmark_target(args, state, control)
        return control

    @staticmethod
    def _unmark_target(args, state, control) -> None:
        """A save about to overwrite an old ``checkpoint-N`` (e.g. resuming from an earlier one) must not
        inherit that directory's marker while it is half rewritten."""
        if control.should_save and state.is_world_process_zero:
            (Path(args.output_dir) / f"{PREFIX}{state.global_step}" / MARKER).unlink(missing_ok=True)

    def on_save(self, args, state, control, **kwargs):  # noqa: D401 - TrainerCallback API
        path = Path(args.output_dir) / f"{PREFIX}{state.global_step}"
        barrier()  # every rank has returned from _save_checkpoint: all shards are on disk
        if state.is_world_process_zero and path.is_dir():
            mark_complete(
                path,
                {
                    "global_step": state.global_step,
                    "epoch": state.epoch,
                    "num_input_tokens_seen": state.num_input_tokens_seen,
                    "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                },
            )
            rotate(args.output_dir, self.save_total_limit)
        barrier()
        return control
