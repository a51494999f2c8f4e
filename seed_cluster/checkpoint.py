"""Checkpoint files: atomic writes, newest-complete discovery with fallback, retention of the last k.

A checkpoint is `step-00001234.pt` in the run's `checkpoints/` directory. It exists
under that name only once complete: it is written to a hidden temporary file in
the same directory, fsynced, then renamed (and the directory fsynced), so a crash
or a kill at any moment leaves either the old set or the new set of files, never
a half file under a real name. What to resume from is found when a job starts,
by listing the directory, never from a path stored in a pickled job.
"""

from __future__ import annotations

import logging
import os
import re
import time
from pathlib import Path
from typing import Any, BinaryIO, Callable, Optional

import torch

from .errors import CheckpointError

logger = logging.getLogger(__name__)

_NAME = re.compile(r"^step-(\d{8,})\.pt$")
FORMAT = "seed-cluster"


class Checkpointer:
    def __init__(self, directory: Path | str, keep: int = 3):
        self.directory = Path(directory)
        self.keep = keep

    def prepare(self) -> None:
        """Create the directory (clear error if impossible) and delete temporaries left by a killed writer."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            probe = self.directory / f".probe-{os.getpid()}"
            probe.touch()
            probe.unlink()
        except OSError as e:
            raise CheckpointError(f"checkpoint directory {self.directory} is not writable ({e.strerror}); "
                                  "choose another output_dir or fix its permissions") from e
        remove_temporaries(self.directory, "step-*")

    def paths(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.directory.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.directory.iterdir() if (m := _NAME.match(p.name))]
        return [p for _, p in sorted(found)]

    def latest(self) -> Optional[Path]:
        paths = self.paths()
        return paths[-1] if paths else None

    def save(self, state: dict[str, Any], step: int) -> tuple[Path, float]:
        """Write `state` atomically as step-<step>.pt, then keep only the newest `keep`. Returns (path, seconds)."""
        start = time.perf_counter()
        final = self.directory / f"step-{step:08d}.pt"
        try:
            atomic_write(final, lambda f: torch.save({"format": FORMAT, **state}, f))
        except OSError as e:
            raise CheckpointError(f"could not write checkpoint {final} ({e.strerror}); "
                                  "check free space and permissions of the run directory") from e
        for old in self.paths()[: -self.keep]:
            old.unlink(missing_ok=True)
        seconds = time.perf_counter() - start
        logger.info("saved checkpoint %s (%.1f MB, %.2f s)", final, final.stat().st_size / 1e6, seconds)
        return final, seconds

    def load_latest(self) -> Optional[tuple[Path, dict[str, Any]]]:
        """The newest readable checkpoint; an unreadable one is logged and the previous one is tried."""
        for path in reversed(self.paths()):
            try:
                start = time.perf_counter()
                state = load(path)
                logger.info("loaded checkpoint %s (step %s, %.2f s)", path, state.get("step"),
                            time.perf_counter() - start)
                return path, state
            except CheckpointError as e:
                logger.warning("%s; falling back to the previous checkpoint", e)
        return None


def load(path: Path) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - truncated/corrupt files raise many different types
        raise CheckpointError(f"checkpoint {path} is unreadable ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a seed-cluster checkpoint")
    return state


def atomic_write(final: Path, write: Callable[[BinaryIO], None]) -> None:
    """`write(f)` into a hidden temporary beside `final`, fsync, rename, fsync the directory: `final` exists
    only complete (a crash or kill at any moment leaves the old file or none, never a half file). The
    temporary is `.<name>.tmp-<pid>`; `remove_temporaries` deletes those a killed writer left behind."""
    final = Path(final)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        fsync_path(final.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def remove_temporaries(directory: Path, pattern: str = "*") -> None:
    """Delete the temporaries of `atomic_write` calls (for files matching `pattern`) that never finished."""
    for stale in Path(directory).glob(f".{pattern}.tmp-*"):
        stale.unlink(missing_ok=True)


def fsync_path(path: Path) -> None:
    """fsync a file or a directory by name (a directory's, so that a rename in it survives a crash)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
